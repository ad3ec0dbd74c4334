"""Thousands of malformed messages to a live server: every one is answered with a typed error, it stays up."""
import json
import os
import random
import time

import pytest
import zmq

from backend.fuzz import KINDS, malformed
from shared_protocol import ErrorCode
from shared_protocol.client import Client

COUNT = int(os.environ.get("FUZZ_COUNT", "10000"))


def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_fuzz_live_server(live_server):
    rng = random.Random(20261124)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(live_server.address)
    pid = live_server.proc.pid

    def blast(n, counts):
        for i in range(n):
            kind = KINDS[i % len(KINDS)]
            sock.send_multipart(malformed(rng, kind))
            assert sock.poll(10000), f"no answer to a {kind} message"
            frames = sock.recv_multipart()
            header = json.loads(frames[0])
            assert header["status"] == "error", (kind, header)
            assert header["error"]["code"] in ErrorCode.ALL and header["error"]["code"] != ErrorCode.INTERNAL, header
            counts[header["error"]["code"]] = counts.get(header["error"]["code"], 0) + 1

    counts = {}
    blast(min(500, COUNT), counts)  # warm up allocator pools before measuring memory
    before = _rss_kb(pid)
    start = time.monotonic()
    blast(COUNT, counts)
    after = _rss_kb(pid)
    sock.close()
    assert live_server.proc.poll() is None, "the server died"
    with Client(live_server.address, timeout=10) as c:
        assert c.ping()["pong"]
    assert after - before < 20_000, f"RSS grew by {after - before} kB"
    assert {ErrorCode.BAD_HEADER, ErrorCode.BAD_ARRAY, ErrorCode.BAD_PARAMS, ErrorCode.UNKNOWN_OP,
            ErrorCode.UNSUPPORTED_VERSION, ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE} <= set(counts)
    print(f"fuzz: {COUNT} messages in {time.monotonic() - start:.1f} s, RSS {before} -> {after} kB, {counts}")
