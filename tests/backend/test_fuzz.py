"""Thousands of malformed messages to a live server: every one is answered with a typed error, it stays up."""
import os
import sys
from pathlib import Path

from shared_protocol import ErrorCode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import reliability  # noqa: E402

COUNT = int(os.environ.get("FUZZ_COUNT", "10000"))


def test_fuzz_live_server(live_server):
    report = reliability.fuzz(COUNT, server=live_server)
    assert report["unanswered"] == 0 and not report["crashed"] and report["serves_after"]
    assert live_server.proc.poll() is None, "the server died"
    codes = set(report["codes"])
    assert codes <= ErrorCode.ALL - {ErrorCode.INTERNAL}, report["codes"]  # typed errors only, never 'ok'
    assert {ErrorCode.BAD_HEADER, ErrorCode.BAD_ARRAY, ErrorCode.BAD_PARAMS, ErrorCode.UNKNOWN_OP,
            ErrorCode.UNSUPPORTED_VERSION, ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE} <= codes
    assert sum(report["codes"].values()) == COUNT
    assert report["rss_after_mb"] - report["rss_before_mb"] < 19.5, report  # under 20,000 kB of growth
    print(f"fuzz: {report}")
