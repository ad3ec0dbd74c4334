"""Reliability figures (``make reliability``): faults, load, fuzzing. Each part prints its figures.

- faults: kill -9 the backend during a localize request N times; each time the client must return a typed
  error within its timeout, no partial output file may be left, and a restarted backend must serve.
- load: C concurrent clients x R mixed requests; every reply must match its request; peak memory (RSS of the
  backend) and latency percentiles.
- fuzz: N malformed messages; 0 crashes, every one answered with a typed error, memory stable.

The parts are functions so that the tests run them small; ``python bench/reliability.py`` runs them full.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.fuzz import KINDS, malformed  # noqa: E402
from backend.process import ServerProcess, free_port, start_server  # noqa: E402
from shared_protocol import ErrorCode, ProtocolError  # noqa: E402
from shared_protocol.client import Client  # noqa: E402

SERVER_ARGS = ["--model", "tiny", "--random-weights", "--device", "cpu"]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def faults(trials: int = 20, timeout: float = 30.0, out_dir: Path = ROOT / "out" / "reliability") -> Dict[str, Any]:
    """kill -9 during localize: typed error in time, no partial file, the restarted backend serves."""
    out_dir.mkdir(parents=True, exist_ok=True)
    address = f"tcp://127.0.0.1:{free_port()}"
    image = out_dir / "fault_canvas.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1536, 1536, 3), dtype=np.uint8)).save(image)
    results: List[Dict[str, Any]] = []
    server = start_server(SERVER_ARGS, address)
    try:
        for trial in range(trials):
            target = out_dir / f"heat_{trial}.tif"
            # the command-line client: it writes its output file only once the whole answer is there
            proc = subprocess.Popen(
                [sys.executable, "-m", "backend", "localize", "--connect", address, "--query", "a river",
                 "--window-sizes", "32", "48", "64", "--smooth", "0", "--timeout", str(timeout), "--out",
                 str(target), str(image)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _wait_for_progress(proc, deadline=time.monotonic() + timeout)  # the request is running now
            time.sleep(random.Random(trial).random() * 0.5)
            started = time.monotonic()
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            _, rest = proc.communicate(timeout=timeout + 30)
            err = rest
            elapsed = time.monotonic() - started
            partial = [p.name for p in out_dir.glob(f".heat_{trial}.tif*")] + (
                [target.name] if target.exists() else [])
            server = start_server(SERVER_ARGS, address)
            with Client(address, timeout=30) as c:
                served = c.ping()["pong"] is True
            typed = "error (" in err and any(code in err for code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT))
            results.append({"trial": trial, "exit": proc.returncode, "typed_error": typed,
                            "error_after_s": round(elapsed, 2), "partial_files": partial, "restarted_serves": served,
                            "stderr": err.strip().splitlines()[-1] if err.strip() else ""})
    finally:
        server.stop()
    ok = [r for r in results if r["exit"] != 0 and r["typed_error"] and not r["partial_files"]
          and r["restarted_serves"] and r["error_after_s"] <= timeout]
    return {"trials": trials, "passed": len(ok), "max_error_after_s": max(r["error_after_s"] for r in results),
            "timeout_s": timeout, "failures": [r for r in results if r not in ok]}


def _wait_for_progress(proc: subprocess.Popen, deadline: float) -> None:
    """Read the client's stderr until its first progress figure ('%') appears."""
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        ch = proc.stderr.read(1)
        if ch in ("%", ""):
            return


def load(clients: int = 8, requests: int = 50, seed: int = 7) -> Dict[str, Any]:
    """Concurrent clients sending mixed requests; every reply must be the answer to its own request."""
    server = start_server(SERVER_ARGS + ["--max-queue", "256"])
    latencies: List[float] = []
    problems: List[str] = []
    lock = threading.Lock()
    stop_sampling = threading.Event()
    samples: List[int] = []

    def sample() -> None:
        while not stop_sampling.wait(0.05):
            samples.append(rss_kb(server.proc.pid))

    def worker(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        with Client(server.address, timeout=120, name=f"load-{k}") as c:
            for i in range(requests):
                kind = ("classify", "rank", "localize", "embed", "ping")[i % 5]
                tag = f"c{k}-r{i}"  # carried in the request and checked in the reply
                t = time.perf_counter()
                try:
                    if kind == "classify":
                        n = int(rng.integers(1, 6))
                        r = c.classify([tag, "forest", "river"], rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8))
                        good = r.result["classes"][0] == tag and r.arrays["probs"].shape == (n, 3)
                    elif kind == "rank":
                        n = int(rng.integers(1, 6))
                        r = c.rank(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), [tag, "b"])
                        good = r.result["queries"][0]["text"] == tag and r.arrays["similarity"].shape == (n, 2)
                    elif kind == "localize":
                        side = int(rng.integers(64, 200))
                        r = c.localize(rng.integers(0, 256, (side, side + 1, 3), dtype=np.uint8), [tag],
                                       window_sizes=[32, 64], smooth=0)
                        good = (r.result["queries"][0]["query"] == tag
                                and r.arrays["heatmaps"].shape == (1, side, side + 1))
                    elif kind == "embed":
                        r = c.embed(texts=[tag, tag + "x"])
                        good = r.arrays["text_embeddings"].shape[0] == 2
                    else:
                        good = c.ping()["pong"] is True
                except ProtocolError as exc:
                    good = False
                    with lock:
                        problems.append(f"{tag} {kind}: {exc}")
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if not good:
                        problems.append(f"{tag} {kind}: reply does not match its request")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    stop_sampling.set()
    peak = peak_rss_kb(server.proc.pid)
    server.stop()
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests_each": requests, "replies": len(latencies),
            "mismatched_or_failed": len(problems), "problems": problems[:10], "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 1),
            "latency_ms": {p: round(float(np.percentile(lat, p)), 1) for p in (50, 90, 99)},
            "latency_ms_max": round(float(lat.max()), 1),
            "backend_peak_rss_mb": round(peak / 1024, 1),
            "backend_rss_mb_during": round(max(samples) / 1024, 1) if samples else None}


def fuzz(count: int = 10000, seed: int = 20261124, server: Optional[ServerProcess] = None) -> Dict[str, Any]:
    """Malformed messages to a live backend: every one gets a typed error; no crash; memory stable.

    ``codes`` counts each reply's error code (or its status, were it not an error) after a warm-up of 500
    messages that lets allocator pools settle before memory is measured. Uses ``server`` when given.
    """
    own = server is None
    server = server or start_server(SERVER_ARGS)
    rng = random.Random(seed)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    codes: Dict[str, int] = {}
    unanswered = 0
    warm = 500
    before = 0
    started = time.perf_counter()
    for i in range(count + warm):
        if i == warm:
            before = rss_kb(server.proc.pid)
            started = time.perf_counter()
        sock.send_multipart(malformed(rng, KINDS[i % len(KINDS)]))
        if not sock.poll(10000):
            unanswered += 1
            continue
        header = json.loads(sock.recv_multipart()[0])
        code = header.get("error", {}).get("code", header.get("status"))
        if i >= warm:
            codes[code] = codes.get(code, 0) + 1
    elapsed = time.perf_counter() - started
    after = rss_kb(server.proc.pid)
    alive = server.proc.poll() is None
    with Client(server.address, timeout=10) as c:
        serves = c.ping()["pong"] is True
    sock.close()
    if own:
        server.stop()
    return {"messages": count, "unanswered": unanswered, "crashed": not alive, "serves_after": serves,
            "codes": codes, "rss_before_mb": round(before / 1024, 1), "rss_after_mb": round(after / 1024, 1),
            "messages_per_s": round(count / elapsed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--fuzz", type=int, default=10000)
    args = ap.parse_args()
    report = {}
    print(f"== faults: kill -9 during localize, {args.faults} times", flush=True)
    report["faults"] = f = faults(args.faults)
    print(f"  {f['passed']}/{f['trials']} trials: typed error, no partial file, restarted backend serves; "
          f"error at most {f['max_error_after_s']} s after the kill (client timeout {f['timeout_s']} s)")
    for fail in f["failures"]:
        print(f"  FAILED: {fail}")
    print(f"== load: {args.clients} clients x {args.requests} mixed requests", flush=True)
    report["load"] = ld = load(args.clients, args.requests)
    print(f"  {ld['replies']} replies, {ld['mismatched_or_failed']} mismatched or failed, {ld['throughput_rps']} req/s")
    print(f"  latency ms p50 {ld['latency_ms'][50]}, p90 {ld['latency_ms'][90]}, p99 {ld['latency_ms'][99]}, "
          f"max {ld['latency_ms_max']}; backend peak RSS {ld['backend_peak_rss_mb']} MB")
    for p in ld["problems"]:
        print(f"  PROBLEM: {p}")
    print(f"== fuzz: {args.fuzz} malformed messages", flush=True)
    report["fuzz"] = fz = fuzz(args.fuzz)
    print(f"  unanswered {fz['unanswered']}, crashed {fz['crashed']}, serves after {fz['serves_after']}, "
          f"RSS {fz['rss_before_mb']} -> {fz['rss_after_mb']} MB, {fz['messages_per_s']} msg/s")
    print(f"  error codes: {fz['codes']}")
    print("RESULT " + json.dumps(report, default=str))
    ok = (f["passed"] == f["trials"] and ld["mismatched_or_failed"] == 0 and fz["unanswered"] == 0
          and not fz["crashed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
