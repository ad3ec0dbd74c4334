"""The reliability harness, run small (``make reliability`` runs it full and prints the figures)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import reliability  # noqa: E402


@pytest.mark.slow
def test_kill_9_during_localize(tmp_path):
    report = reliability.faults(trials=2, timeout=30.0, out_dir=tmp_path)
    assert report["passed"] == 2, report["failures"]
    assert report["max_error_after_s"] < 30.0


def test_concurrent_clients_get_their_own_answers():
    report = reliability.load(clients=4, requests=10)
    assert report["replies"] == 40 and report["mismatched_or_failed"] == 0, report["problems"]


@pytest.mark.slow
def test_issue_11_attack_parts_run_small():
    from backend.process import start_server
    server = start_server(reliability.ATTACK_ARGS)
    try:
        rows = reliability.attacks(server)
        assert all(r["code"] == r["expected"] and r["worker_alive"] for r in rows), rows
        idle = reliability.idle_connections(100, server, hold_s=1.0)
        assert idle["connections_opened"] == 100 and idle["newcomer_ping_ms"] is not None
        big = reliability.big_message(1024, server)  # 16 x the limit: the guard scans at its own pace on a busy machine
        assert all(r["hung_up"] for r in big["shapes"].values()) and big["ping_ms"] is not None
    finally:
        server.stop()
