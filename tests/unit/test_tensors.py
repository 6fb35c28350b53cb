from __future__ import annotations

import pytest
import torch

from zmqmodels.errors import ProtocolError
from zmqmodels.protocol.tensors import DTYPE_NAMES, decode, encode, torch_dtype


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_every_dtype_round_trips(name) -> None:
    dtype = torch_dtype(name)
    t = (torch.randn(3, 5) * 10).to(dtype)
    spec, bufs = encode(t)
    assert torch.equal(decode(spec, [bytes(b) for b in bufs]), t)


def test_nested_tree_and_scalars() -> None:
    tree = {"a": (torch.arange(3), [torch.ones(0, 2), 1, 2.5, "s", None, True]),
            "b": torch.tensor(3.0), "c": torch.randn(4, 4).t()}  # non-contiguous
    spec, bufs = encode(tree)
    out = decode(spec, [bytes(b) for b in bufs])
    assert torch.equal(out["c"], tree["c"]) and out["a"][1][1:] == [1, 2.5, "s", None, True]


@pytest.mark.parametrize("spec,bufs,needle", [
    ({"t": "tensor", "dtype": "float32", "shape": [2], "f": 0}, [b"\0" * 7], "needs 8 bytes"),
    ({"t": "tensor", "dtype": "float99", "shape": [2], "f": 0}, [b"\0" * 8], "unknown dtype"),
    ({"t": "tensor", "dtype": "float32", "shape": [-1], "f": 0}, [b""], "bad shape"),
    ({"t": "tensor", "dtype": "float32", "shape": [1], "f": 3}, [b"\0" * 4], "buffer index"),
    ({"t": "tensor", "dtype": "float32", "shape": [1], "f": 0}, [b"\0" * 4, b""], "not referenced"),
    ({"t": "tuple", "items": [{"t": "tensor", "dtype": "float32", "shape": [1], "f": 0}] * 2},
     [b"\0" * 4], "reused"),
    ({"t": "int", "v": "x"}, [], "int node"),
    ({"t": "wat"}, [], "unknown"),
    ([1, 2], [], "malformed"),
])
def test_bad_specs_are_protocol_errors(spec, bufs, needle) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode(spec, bufs)


def test_join_rows_and_split_rows_read_what_the_spec_says_and_refuse_the_rest() -> None:
    """The worker's batch fast path: requests' bytes joined by their spec, outputs split into
    views; anything malformed is left to the per-request path (None)."""
    import numpy as np

    from zmqmodels.protocol.tensors import join_rows, split_rows

    spec = {"t": "tuple", "items": [{"t": "tensor", "dtype": "float32", "shape": [1, 2], "f": 0}]}
    a, b = np.array([[1, 2]], "<f4"), np.array([[3, 4]], "<f4")
    joined_spec, bufs = join_rows(spec, [[a.tobytes()], [b.tobytes()]])
    assert joined_spec["items"][0]["shape"] == [2, 2]
    assert np.frombuffer(bufs[0], "<f4").tolist() == [1, 2, 3, 4]
    assert join_rows(spec, [[a.tobytes()], [b.tobytes()[:4]]]) is None  # a short buffer
    assert join_rows(spec, [[a.tobytes()], [b.tobytes(), b"x"]]) is None  # an extra buffer
    for bad in (["a", "b"], [True, 2], [-1, -2], []):
        odd = {"t": "tuple", "items": [{**spec["items"][0], "shape": bad}]}
        assert join_rows(odd, [[a.tobytes()], [b.tobytes()]]) is None, bad
    out = {"t": "tuple", "items": [{"t": "tensor", "dtype": "float32", "shape": [3, 2], "f": 0}]}
    y = memoryview(np.arange(6, dtype="<f4").tobytes())
    parts = split_rows(out, [y], [1, 2])
    assert [p[0]["items"][0]["shape"] for p in parts] == [[1, 2], [2, 2]]
    assert np.frombuffer(parts[1][1][0], "<f4").tolist() == [2, 3, 4, 5]
    assert out["items"][0]["shape"] == [3, 2]  # the whole's spec is left as it was
    assert split_rows(out, [y], [1, 1]) is None  # the output does not follow the batch
