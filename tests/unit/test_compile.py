from __future__ import annotations

import pytest
import torch

from tests.models import BN, DictTuple, LeNet, Mixed, NumpyDouble, OnlyTraces, ScriptableSignFlip, SignFlip
from zmqmodels import CompileError, ParityError, compare_outputs, compile_model


def test_lenet_scripts_and_matches_eager() -> None:
    model = LeNet()
    c = compile_model(model, [torch.randn(1, 1, 28, 28), torch.randn(3, 1, 28, 28)])
    assert c.method == "script"
    assert isinstance(c.module, torch.jit.ScriptModule)
    assert c.outputs[1].shape == (3, 10)
    assert c.max_abs_diff == 0.0


def test_traced_frozen_branch_is_caught_by_second_example() -> None:
    """Asked to trace, a frozen branch is still caught by parity on the example not traced."""
    with pytest.raises(ParityError) as err:
        compile_model(SignFlip(), [torch.ones(3), -torch.ones(3)], method="trace")
    msg = str(err.value)
    assert "example 1" in msg and "out" in msg and "max abs diff 2" in msg


def test_a_blind_trace_that_drew_a_tracer_warning_is_refused_unless_asked_for() -> None:
    """When scripting and ``torch.export`` both fail, a trace that drew a TracerWarning is
    refused with the warnings shown; ``method="trace"`` accepts it."""
    examples = [torch.rand(3) + 0.1, torch.rand(3) + 0.2]
    with pytest.raises(CompileError) as err:
        compile_model(SignFlip(), examples)
    msg = str(err.value)
    assert "torch.jit.script failed" in msg and "torch.export failed" in msg
    assert "TracerWarning: Converting a tensor to a Python boolean" in msg and "--trace" in msg
    c = compile_model(SignFlip(), examples, method="trace")
    assert c.method == "trace" and any("TracerWarning" in w for w in c.warnings)


def test_the_guard_a_trace_would_drop_is_refused_and_the_scripting_error_is_whole() -> None:
    """``super().forward`` (unscriptable) behind ``if x.max() > 100: raise``: export refuses the
    data-dependent branch and the trace that would drop it is refused; the scripting error is
    shown whole, without the ``.:`` TorchScript ends its first line with."""
    from tests.models import make_guarded

    model, examples = make_guarded()
    with pytest.raises(CompileError) as err:
        compile_model(model, examples)
    msg = str(err.value)
    assert "'Tensor' object has no attribute or method 'forward'.\n" in msg and ".:" not in msg
    assert "<--- HERE" in msg  # the whole scripting error: where it failed
    assert "Could not guard on data-dependent expression" in msg  # the exporter's reason
    assert "TracerWarning" in msg
    with pytest.raises(CompileError, match="torch.export failed"):
        compile_model(model, examples, formats=["pt2"])


def test_an_unscriptable_model_that_exports_is_traced_and_says_so() -> None:
    c = compile_model(OnlyTraces(), [torch.randn(2, 4), torch.randn(5, 4)])
    assert c.method == "trace"
    assert any("torch.export succeeded" in w for w in c.warnings), c.warnings


def test_scripting_keeps_control_flow() -> None:
    c = compile_model(ScriptableSignFlip(), [torch.ones(3), -torch.ones(3)])
    assert c.method == "script"
    assert torch.equal(c.module(-torch.ones(2)), torch.ones(2))


def test_no_trace_refuses_unscriptable() -> None:
    with pytest.raises(CompileError, match="torch.jit.script failed"):
        compile_model(OnlyTraces(), [torch.randn(2, 4)], allow_trace=False)


def test_model_that_only_traces() -> None:
    c = compile_model(OnlyTraces(), [torch.randn(2, 4), torch.randn(5, 4)])
    assert c.method == "trace"
    assert c.outputs[1].shape == (5, 4)


def test_traced_submodule_inside_scripted_module() -> None:
    model = Mixed()
    x = torch.randn(3, 4)
    c = compile_model(model, [x, -x])
    assert c.method == "script"
    assert torch.allclose(c.module(x), model(x))


def test_dict_and_tuple_outputs_compare_structurally() -> None:
    c = compile_model(DictTuple(), [torch.randn(2, 4), torch.randn(1, 4)])
    out, idx = c.outputs[0]
    assert set(out) == {"logits", "probs"} and idx.dtype == torch.int64


def test_batchnorm_compiles_in_eval_mode() -> None:
    model = BN()
    model.train()
    c = compile_model(model, [torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)])
    assert not model.training and not c.module.training
    # eval mode: one sample's output does not depend on the batch it came in
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(c.module(x)[:1], c.module(x[:1]), atol=1e-6)


def test_bf16_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU()).to(torch.bfloat16)
    c = compile_model(model, [torch.randn(2, 16, dtype=torch.bfloat16)] * 2)
    assert c.outputs[0].dtype == torch.bfloat16


def test_prescripted_module_passes_through() -> None:
    scripted = torch.jit.script(LeNet().eval())
    c = compile_model(scripted, torch.randn(1, 1, 28, 28))
    assert c.method == "prescripted" and c.module is scripted


def test_plain_function_is_traced() -> None:
    c = compile_model(lambda x: x * 2, [torch.ones(2), torch.zeros(2)])
    assert c.method == "trace"
    assert torch.equal(c.module(torch.ones(3)), torch.full((3,), 2.0))


def test_example_inputs_forms() -> None:
    with pytest.raises(CompileError, match="at least one"):
        compile_model(LeNet(), [])
    with pytest.raises(CompileError, match="must be a tensor"):
        compile_model(LeNet(), "nope")


def test_compare_outputs_names_the_path() -> None:
    a = ({"x": torch.zeros(2)}, [torch.ones(1)])
    b = ({"x": torch.zeros(2)}, [torch.ones(1) + 0.5])
    with pytest.raises(ParityError, match=r"out\[1\]\[0\]: max abs diff 0.5"):
        compare_outputs(a, b)
    with pytest.raises(ParityError, match="keys"):
        compare_outputs({"a": torch.ones(1)}, {"b": torch.ones(1)})
    with pytest.raises(ParityError, match="integer"):
        compare_outputs(torch.tensor([1, 2]), torch.tensor([1, 3]))
    with pytest.raises(ParityError, match="NaN"):
        compare_outputs(torch.tensor([float("nan")]), torch.tensor([0.0]))
    with pytest.raises(ParityError, match="NaN never equals NaN"):  # two NaN prove nothing
        compare_outputs(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    inf = float("inf")
    assert compare_outputs(torch.tensor([inf, -inf, 1.0]), torch.tensor([inf, -inf, 1.0])) == 0
    with pytest.raises(ParityError, match="Inf"):
        compare_outputs(torch.tensor([inf]), torch.tensor([-inf]))


def test_one_example_is_no_evidence_for_a_trace_fallback() -> None:
    """A model computing in numpy fell back to tracing on one example, passed parity on that
    same example and shipped a constant. One example now refuses the fallback, saying why and
    showing the whole scripting error (its last lines say where)."""
    with pytest.raises(CompileError) as err:
        compile_model(NumpyDouble(), [torch.randn(2, 3)])
    msg = str(err.value)
    assert "a trace of one example proves nothing" in msg and "--trace" in msg
    assert "<--- HERE" in msg and "np.asarray" in msg  # the scripting error, whole


def test_examples_that_share_an_input_are_no_evidence_either() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(CompileError, match="no example differs from example 0 in every"):
        compile_model(NumpyDouble(), [x, x.clone()])


def test_a_trace_that_froze_a_value_fails_parity_and_quotes_the_tracer_warnings() -> None:
    with pytest.raises(CompileError) as err:  # refused before parity: the tracer warned
        compile_model(NumpyDouble(), [torch.randn(2, 3), torch.randn(2, 3)])
    assert "TracerWarning: Converting a tensor to a NumPy array" in str(err.value)
    with pytest.raises(ParityError) as err:  # asked for: parity on the other example catches it
        compile_model(NumpyDouble(), [torch.randn(2, 3), torch.randn(2, 3)], method="trace")
    msg = str(err.value)
    assert "example 1" in msg and "does not generalise" in msg
    assert "TracerWarning: Converting a tensor to a NumPy array" in msg  # printed, not "see warnings"


def test_explicit_trace_takes_one_example() -> None:
    c = compile_model(SignFlip(), [torch.rand(3) + 0.1], method="trace")
    assert c.method == "trace"


def test_no_trace_shows_the_whole_scripting_error() -> None:
    with pytest.raises(CompileError) as err:
        compile_model(NumpyDouble(), [torch.randn(2, 3)], allow_trace=False)
    assert "<--- HERE" in str(err.value) and "Not falling back" not in str(err.value)
