"""What the C++ node takes from the Python tables is generated, and current: the error codes,
the follower's timers and thresholds and the default limits (``cpp/src/generated.hpp``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_cpp_header_is_current() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cpp_header.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_cpp_node_retypes_no_code_table_timer_or_threshold() -> None:
    """Timers, thresholds and the retryable and server-error lists come from generated.hpp."""
    src = {p.name: p.read_text() for p in (ROOT / "cpp" / "src").glob("*.[ch]pp")
           if p.name != "generated.hpp"}
    for name, text in src.items():
        assert not re.search(r"\b(0\.25|3\.0|2\.0)\b", text), name
        codes = "not_ready|worker_lost|unavailable|model_error|internal"
        assert not re.search(rf'code == "({codes})"', text), name
    assert "gen::CORRUPT_FETCHES_MAX" in src["follower.cpp"] and "gen::STALL_FACTOR" in src["follower.cpp"]
    assert "gen::EVIDENCE_S" in src["batching.cpp"] and "gen::GAP_WEIGHT" in src["batching.cpp"]
    assert "gen::frame_arity" in src["frames.cpp"]  # the framing table's arity is the Python table's


def test_every_code_has_one_row_and_the_derived_tables_agree() -> None:
    from zmqmodels.oip.codec import error_for
    from zmqmodels.protocol import SERVING_CODES
    from zmqmodels.protocol.codes import SERVER_ERRORS, Code

    assert {c.value for c in Code if c.node} == set(SERVING_CODES)
    assert SERVER_ERRORS == {"model_error", "internal", "worker_lost"}
    for c in Code:
        e = error_for(c.value, "x")
        assert (e.status, e.grpc) == (c.http, c.grpc)
    assert (error_for("no such code", "x").status, Code.of("no such code")) == (500, Code.INTERNAL)
