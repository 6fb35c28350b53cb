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
