"""The transport: request ids, heartbeats, progress, cancel, timeouts, Lazy Pirate retries, auth, busy."""
import threading
import time

import numpy as np
import pytest

from backend.server import Server, ServerConfig, is_loopback
from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.client import Client
from shared_protocol.endpoints import free_port
from stubs import SlowService, running_server


def test_hello_info_ping_and_echo(addr):
    with running_server(addr), Client(addr, timeout=5) as c:
        info = c.hello()
        assert info["protocol"] == 1 and info["model"]["name"] == "stub" and "classify" in info["operations"]
        assert info["server"]["requests"] >= 1 and info["server"]["errors"] == 0
        assert c.ping()["pong"] is True
        tiles = np.arange(2 * 3 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3, 3)
        reply = c.classify(["a", "b"], tiles, top_k=1)
        assert reply.result["classes"] == ["a", "b"]
        np.testing.assert_array_equal(reply.arrays["tiles"], tiles)


def test_heartbeats_keep_a_long_request_alive_and_progress_arrives(addr):
    seen = []
    with running_server(addr), Client(addr, timeout=10, heartbeat_interval=0.1, heartbeat_liveness=3) as c:
        reply = c.classify(["a"], np.zeros((1, 2, 2, 3), np.uint8), top_k=15,
                           on_progress=lambda p, m: seen.append(p))
    assert reply.status == "ok"
    assert len(seen) >= 5 and seen == sorted(seen)


def test_cancel_stops_a_running_request_and_the_server_goes_on(addr):
    service = SlowService()
    cancel = threading.Event()
    with running_server(addr, service), Client(addr, timeout=20) as c:
        threading.Timer(0.3, cancel.set).start()
        t = time.monotonic()
        with pytest.raises(ProtocolError) as e:
            c.classify(["a"], np.zeros((1, 2, 2, 3), np.uint8), top_k=100, cancel=cancel)
        assert e.value.code == ErrorCode.CANCELLED
        assert time.monotonic() - t < 3
        assert c.ping()["pong"]
        assert c.info()["server"]["errors"] == 1  # the worker's 'cancelled' reply is counted
        assert service.handled == []  # the cancelled job never finished


def test_timeout_when_nothing_answers_is_typed_and_bounded(addr):
    with Client(addr, timeout=0.4, retries=1, heartbeat_interval=10) as c:
        t = time.monotonic()
        with pytest.raises(ProtocolError) as e:
            c.info()
        elapsed = time.monotonic() - t
    assert e.value.code == ErrorCode.TIMEOUT and e.value.details["attempts"] == 2
    assert 0.7 < elapsed < 3


def test_lazy_pirate_retry_reaches_a_restarted_server(addr):
    with running_server(addr), Client(addr, timeout=5) as c:
        assert c.ping()["pong"]
    result = {}

    def ask():
        with Client(addr, timeout=0.5, retries=8, heartbeat_interval=10) as c2:
            result["info"] = c2.info()

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(1.2)  # at least two attempts fail first
    with running_server(addr):
        asker.join(10)
    assert result["info"]["protocol"] == 1


def test_a_dead_server_is_detected_by_heartbeat_before_the_timeout(addr):
    service = SlowService()
    c = Client(addr, timeout=60, retries=0, heartbeat_interval=0.2, heartbeat_liveness=3)
    errors = []

    def ask():
        try:
            c.classify(["a"], np.zeros((1, 2, 2, 3), np.uint8), top_k=200)
        except ProtocolError as exc:
            errors.append(exc)

    with running_server(addr, service):
        asker = threading.Thread(target=ask)
        asker.start()
        assert service.started.wait(5)
    t = time.monotonic()  # the server is gone: no reply, no pongs
    asker.join(30)
    c.close()
    assert errors and errors[0].code == ErrorCode.UNAVAILABLE
    assert time.monotonic() - t < 5


def test_stale_replies_are_never_taken_for_the_next_answer(addr):
    with running_server(addr), Client(addr, timeout=0.3, retries=0, heartbeat_interval=10) as c:
        with pytest.raises(ProtocolError):
            c.classify(["slow"], np.zeros((1, 2, 2, 3), np.uint8), top_k=5)
        reply = c.request("classify", {"classes": ["fast"], "top_k": 1}, {"tiles": np.zeros((1, 1, 1, 1), np.uint8)},
                          timeout=5)
        assert reply.result["classes"] == ["fast"]


def test_abandoned_attempts_are_cancelled_on_the_server(addr):
    service = SlowService()
    with running_server(addr, service), Client(addr, timeout=0.5, retries=1, heartbeat_interval=10) as c:
        with pytest.raises(ProtocolError) as e:
            c.classify(["a"], np.zeros((1, 2, 2, 3), np.uint8), top_k=10)  # 1 s of work, 0.5 s per attempt
        assert e.value.code == ErrorCode.TIMEOUT and e.value.details["attempts"] == 2
        time.sleep(2.0)  # long enough for both attempts to have finished, had they not been cancelled
        assert service.handled == []
        assert c.ping()["pong"]


def test_non_loopback_bind_needs_a_token_and_wrong_tokens_are_rejected():
    assert is_loopback("tcp://127.0.0.1:1") and is_loopback("tcp://localhost:1") and is_loopback("ipc:///tmp/x")
    assert is_loopback("tcp://[::1]:5") and not is_loopback("tcp://0.0.0.0:1") and not is_loopback("tcp://*:1")
    with pytest.raises(ValueError, match="token"):
        Server(SlowService(), ServerConfig(bind=f"tcp://0.0.0.0:{free_port()}"))
    port = free_port()
    with running_server(f"tcp://0.0.0.0:{port}", token="s3cret"):
        addr = f"tcp://127.0.0.1:{port}"
        with Client(addr, token="wrong", timeout=2, retries=0) as c, pytest.raises(ProtocolError) as e:
            c.ping()
        assert e.value.code == ErrorCode.UNAUTHORIZED
        with Client(addr, timeout=2, retries=0) as c, pytest.raises(ProtocolError) as e:
            c.ping()
        assert e.value.code == ErrorCode.UNAUTHORIZED
        with Client(addr, token="s3cret", timeout=2) as c:
            assert c.hello()["server"]["auth"] is True


def test_ipc_transport(tmp_path):
    addr = f"ipc://{tmp_path}/backend.sock"
    with running_server(addr), Client(addr, timeout=5) as c:
        assert c.ping()["pong"]


def test_a_full_queue_answers_busy(addr):
    with running_server(addr, max_queue=1):
        clients = [Client(addr, timeout=10, retries=0) for _ in range(3)]
        outcomes = []

        def ask(c):
            try:
                c.classify(["a"], np.zeros((1, 1, 1, 3), np.uint8), top_k=5)
                outcomes.append("ok")
            except ProtocolError as exc:
                outcomes.append(exc.code)

        threads = [threading.Thread(target=ask, args=(c,)) for c in clients]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(20)
        for c in clients:
            c.close()
    assert outcomes.count(ErrorCode.BUSY) >= 1 and outcomes.count("ok") >= 1


def test_shutdown_stops_the_server(addr):
    service = SlowService()
    with running_server(addr, service) as server, Client(addr, timeout=5) as c:
        assert c.shutdown()["stopping"] is True
        deadline = time.monotonic() + 5
        while not server._stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server._stop.is_set()


def test_a_canvas_is_sent_once_then_named_by_its_id(addr):
    from shared_protocol.client import CANVAS_IDS
    from stubs import CanvasService
    service = CanvasService()
    canvas = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    other = canvas[::-1].copy()
    with running_server(addr, service), Client(addr, timeout=5) as c:
        first = c.localize(canvas, ["q"])
        assert service.sent == [True]
        with Client(addr, timeout=5) as c2:  # another client (a plugin task) in the same process
            again = c2.localize(canvas.copy(), ["q2"])
        assert service.sent == [True, False]  # only the id went
        assert again.result["canvas_id"] == first.result["canvas_id"]
        np.testing.assert_array_equal(again.arrays["heatmaps"], first.arrays["heatmaps"])
        c.localize(other, ["q"])
        assert service.sent[-1] is True  # other pixels: sent
        service.forget()  # e.g. evicted from the server's cache, or a restarted server
        reply = c.localize(canvas, ["q"])
        assert service.sent[-2:] == [False, True]  # the id was refused, so the canvas went again
        np.testing.assert_array_equal(reply.arrays["heatmaps"][0], canvas[:, :, 0])
        with Client(addr, timeout=5, reuse_canvas=False) as c3:
            c3.localize(canvas, ["q"])
        assert service.sent[-1] is True
        with pytest.raises(ProtocolError) as e:  # naming an unknown canvas explicitly: the typed error
            c.localize(None, ["q"], canvas_id="0123abcd")
        assert e.value.code == ErrorCode.NOT_FOUND and e.value.details["reason"] == "canvas_unknown"
    assert CANVAS_IDS.get(addr, CANVAS_IDS.digest(canvas)) == first.result["canvas_id"]


def test_canvas_id_memory_is_bounded_and_keyed_by_server():
    from shared_protocol.client import CanvasIds
    ids = CanvasIds(max_entries=2)
    a, b, c = (np.full((2, 2, 3), v, np.uint8) for v in (1, 2, 3))
    assert ids.digest(a) == ids.digest(a.copy()) != ids.digest(b)
    assert ids.digest(a) != ids.digest(a.reshape(2, 6))  # the shape counts, not only the bytes
    ids.put("tcp://x", ids.digest(a), "ia")
    ids.put("tcp://x", ids.digest(b), "ib")
    assert ids.get("tcp://y", ids.digest(a)) is None  # another server
    assert ids.get("tcp://x", ids.digest(a)) == "ia"  # used: now the most recent
    ids.put("tcp://x", ids.digest(c), "ic")
    assert ids.get("tcp://x", ids.digest(b)) is None and ids.get("tcp://x", ids.digest(a)) == "ia"
    ids.forget("tcp://x", ids.digest(a))
    assert ids.get("tcp://x", ids.digest(a)) is None
