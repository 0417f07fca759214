"""The error table: one code -> one HTTP status, the same in the code and in docs/errors.md."""

from __future__ import annotations

import re
from pathlib import Path

from mgpumanager.errors import ERROR_TABLE, BrokerError, ErrorCode

TABLE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def test_every_code_has_one_status_and_the_readme_table_matches() -> None:
    text = TABLE.read_text()
    table = text.split("<!-- error-table")[1].split("<!-- /error-table -->")[0]
    rows = re.findall(r"^\| `(\w+)` \| (\d{3}) \| (yes|no) \| (.+?) \|$", table, re.M)
    documented = {
        code: (int(status), retry == "yes", meaning) for code, status, retry, meaning in rows
    }
    in_code = {str(c): (s.status, s.retryable, s.meaning) for c, s in ERROR_TABLE.items()}
    assert documented == in_code
    assert set(ERROR_TABLE) == set(ErrorCode)


def test_envelope_shape_and_retryable_override() -> None:
    err = BrokerError(
        ErrorCode.INSUFFICIENT_VRAM, "busy in the way", consumer="ollama", retryable=True
    )
    assert err.status == 507
    assert err.envelope() == {
        "error": "insufficient_vram",
        "message": "busy in the way",
        "consumer": "ollama",
        "retryable": True,
    }
    assert BrokerError(ErrorCode.QUEUE_FULL, "x").retryable is True


def test_the_public_surface_is_exported() -> None:
    import mgpumanager

    for name in mgpumanager.__all__:
        assert getattr(mgpumanager, name) is not None, name
