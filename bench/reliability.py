"""Reliability figures (``make reliability``): faults, load, fuzzing. Each part prints its figures.

- faults: kill -9 the backend during a localize request N times; each time the client must return a typed
  error within its timeout, no partial output file may be left, and a restarted backend must serve.
- load: C concurrent clients x R mixed requests; every reply must match its request; peak memory (RSS of the
  backend) and latency percentiles.
- fuzz: N malformed messages; 0 crashes, every one answered with a typed error, memory stable.
- attacks (issue 11): each attack as a named case (typed error in N ms, RSS before/after, worker alive); 2,000
  idle connections; a client that never reads; a 1 GB message against a 64 MB limit; kill -9 during each op.

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
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.fuzz import ATTACKS, KINDS, malformed, zmtp_connect, zmtp_frame_header  # noqa: E402
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


# -- issue 11: attacks ------------------------------------------------------------------------------------------
ATTACK_ARGS = SERVER_ARGS + ["--max-array-mb", "32", "--memory-budget-mb", "2048"]  # a 64 MB message limit


def _info(address: str) -> Dict[str, Any]:
    with Client(address, timeout=15, retries=0) as c:
        return c.info()


def _ping_ms(address: str, timeout: float = 15.0) -> Optional[float]:
    t = time.perf_counter()
    try:
        with Client(address, timeout=timeout, retries=0) as c:
            c.ping()
    except ProtocolError:
        return None
    return round((time.perf_counter() - t) * 1000, 1)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _host_port(address: str):
    host, port = address[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


def attacks(server: Optional[ServerProcess] = None) -> List[Dict[str, Any]]:
    """Each message attack of issue 11 (``backend.fuzz.ATTACKS``): the typed error and its time, RSS before and
    after, whether ping and the worker still answer."""
    own = server is None
    server = server or start_server(ATTACK_ARGS)
    rows = []
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        for name, (frames, expected) in ATTACKS.items():
            before = rss_kb(server.proc.pid)
            t = time.perf_counter()
            sock.send_multipart(frames)
            code = None
            if sock.poll(30000):
                code = json.loads(sock.recv_multipart()[0]).get("error", {}).get("code")
            ms = round((time.perf_counter() - t) * 1000, 1)
            info = _info(server.address)["server"]
            rows.append({"attack": name, "expected": expected, "code": code, "ms": ms,
                         "rss_mb": [round(before / 1024), round(rss_kb(server.proc.pid) / 1024)],
                         "ping_ms": _ping_ms(server.address), "worker_alive": info["worker_alive"]})
    finally:
        sock.close()
        if own:
            server.stop()
    return rows


def idle_connections(count: int = 2000, server: Optional[ServerProcess] = None, hold_s: float = 5.0
                     ) -> Dict[str, Any]:
    """``count`` connections that finish the ZMTP handshake and then say nothing: the server's CPU while they
    sit, a newcomer's ping, the connections the server keeps."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 1024)), hard))
    own = server is None
    server = server or start_server(ATTACK_ARGS)
    host, port = _host_port(server.address)
    conns, refused = [], 0
    before = rss_kb(server.proc.pid)
    t = time.perf_counter()
    try:
        for _ in range(count):
            try:
                conns.append(zmtp_connect(host, port))
            except OSError:
                refused += 1
        opened_s = time.perf_counter() - t
        cpu0, t0 = _cpu_s(server.proc.pid), time.monotonic()
        time.sleep(hold_s)
        cpu = (_cpu_s(server.proc.pid) - cpu0) / (time.monotonic() - t0)
        ping = _ping_ms(server.address)
        info = _info(server.address)["server"]
        return {"connections_opened": len(conns), "refused": refused, "open_s": round(opened_s, 2),
                "server_cpu_percent_while_idle": round(100 * cpu, 1), "newcomer_ping_ms": ping,
                "server_keeps": info["connections"], "max_connections": info["max_connections"],
                "evicted": info["evicted"], "fd_limit": info["fd_limit"], "scan_interval_ms": info["scan_interval_ms"],
                "rss_mb": [round(before / 1024), round(rss_kb(server.proc.pid) / 1024)]}
    finally:
        for c in conns:
            c.close()
        if own:
            server.stop()


def non_reading_client(requests: int = 40, side: int = 2048, server: Optional[ServerProcess] = None
                       ) -> Dict[str, Any]:
    """A client that sends ``requests`` localize requests (a ``side``^2 heatmap, 16 MiB at 2048, each) and never
    reads: what the server holds for it, what it dropped, whether others are served."""
    own = server is None
    server = server or start_server(ATTACK_ARGS)
    rng = np.random.default_rng(3)
    canvas = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    with Client(server.address, timeout=300, retries=0) as c:  # the canvas once, so the server holds it
        canvas_id = c.localize(canvas, ["warm"], window_sizes=[256], smooth=0).result["canvas_id"]
    before = rss_kb(server.proc.pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 65536)
    sock.connect(server.address)
    from shared_protocol import Request
    t = time.perf_counter()
    for i in range(requests):
        sock.send_multipart(Request("localize", f"nr-{i}", {"queries": [f"query {i}"], "canvas_id": canvas_id,
                                                           "window_sizes": [256], "smooth": 0}).encode())
    pings = []
    peak = before
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        peak = max(peak, rss_kb(server.proc.pid))
        pings.append(_ping_ms(server.address))
        info = _info(server.address)["server"]
        if info["queued"] == 0 and info["replies_dropped"] > 0 and time.perf_counter() - t > 5:
            break
        time.sleep(0.5)
    info = _info(server.address)["server"]
    sock.close()
    ctx.term()
    result = {"requests": requests, "reply_mb_each": round(side * side * 4 / 2 ** 20, 1),
              "replies_dropped": info["replies_dropped"], "skipped_unread": info["skipped_unread"],
              "rss_mb": [round(before / 1024), round(peak / 1024)],
              "ping_ms_max": max([p for p in pings if p is not None], default=None),
              "pings_unanswered": sum(p is None for p in pings), "seconds": round(time.perf_counter() - t, 1)}
    if own:
        server.stop()
    return result


def big_message(total_mb: int = 1024, server: Optional[ServerProcess] = None) -> Dict[str, Any]:
    """A ``total_mb`` message against the 64 MB message limit, by hand over ZMTP: as one frame, and as 64 MB
    frames that never end the message. How much the server took before it hung up, and its memory."""
    own = server is None
    server = server or start_server(ATTACK_ARGS)
    host, port = _host_port(server.address)
    limits = _info(server.address)["limits"]
    chunk = b"\0" * (1 << 20)
    rows = {}
    for shape in ("one frame", "64 MB frames, never finished"):
        before = rss_kb(server.proc.pid)
        sock = zmtp_connect(host, port)
        sent = 0
        t = time.perf_counter()
        try:
            if shape == "one frame":
                sock.sendall(zmtp_frame_header(total_mb << 20, more=False))
                while sent < total_mb << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
            else:
                frame = 64 << 20
                while sent < total_mb << 20:
                    sock.sendall(zmtp_frame_header(frame, more=True))
                    for _ in range(frame // len(chunk)):
                        sock.sendall(chunk)
                        sent += len(chunk)
        except OSError:
            pass
        ms = round((time.perf_counter() - t) * 1000, 1)
        sock.close()
        time.sleep(0.5)
        rows[shape] = {"sent_mb_before_hang_up": round(sent / 2 ** 20), "hung_up": sent < total_mb << 20,
                       "after_ms": ms, "rss_mb": [round(before / 1024), round(rss_kb(server.proc.pid) / 1024)],
                       "peak_rss_mb": round(peak_rss_kb(server.proc.pid) / 1024)}
    info = _info(server.address)["server"]
    limit = limits["max_total_bytes"] + limits["max_header_bytes"]
    out = {"message_mb": total_mb, "limit_mb": round(limit / 2 ** 20), "shapes": rows,
           "cut_unfinished": info["cut_unfinished"], "ping_ms": _ping_ms(server.address)}
    if own:
        server.stop()
    return out


def _run_op(address: str, timeout: float, send: Callable, started: threading.Event, outcome: Dict[str, Any]) -> None:
    try:
        with Client(address, timeout=timeout, retries=1, heartbeat_interval=0.5) as c:
            send(c, {"on_progress": lambda p, m: started.set()})
        outcome["code"] = "ok (finished before the kill)"
    except ProtocolError as exc:
        outcome["code"] = exc.code
    outcome["at"] = time.monotonic()


def kill_each_op(trials: int = 2, timeout: float = 30.0) -> List[Dict[str, Any]]:
    """kill -9 of the backend (the worker thread's host) during classify, rank, localize and embed: a typed error
    and how long after the kill, then a restarted backend serves."""
    address = f"tcp://127.0.0.1:{free_port()}"
    rng = np.random.default_rng(5)
    img = lambda n: rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)  # noqa: E731
    sends = {
        "classify": lambda c, kw: c.classify([f"class {i}" for i in range(300)], img(256), **kw),
        "rank": lambda c, kw: c.rank(img(1024), ["a", "b"], **kw),
        "localize": lambda c, kw: c.localize(rng.integers(0, 256, (1536, 1536, 3), dtype=np.uint8), ["q"],
                                             window_sizes=[32, 48, 64], smooth=0, **kw),
        "embed": lambda c, kw: c.embed(img(2048), ["a"], **kw),
    }
    rows = []
    server = start_server(SERVER_ARGS, address)
    try:
        for op, send in sends.items():
            for trial in range(trials):
                started = threading.Event()
                outcome: Dict[str, Any] = {}

                thread = threading.Thread(target=_run_op, args=(address, timeout, send, started, outcome))
                thread.start()
                started.wait(timeout)
                time.sleep(random.Random(trial).random() * 0.3)
                killed = time.monotonic()
                os.kill(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
                thread.join(timeout * 3)
                server = start_server(SERVER_ARGS, address)
                rows.append({"op": op, "trial": trial, "code": outcome.get("code"),
                             "error_after_s": round(outcome["at"] - killed, 2) if "at" in outcome else None,
                             "restarted_serves": _ping_ms(address) is not None})
    finally:
        server.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--fuzz", type=int, default=10000)
    ap.add_argument("--idle", type=int, default=2000, help="idle connections")
    ap.add_argument("--unread", type=int, default=40, help="requests of the client that never reads")
    ap.add_argument("--message-mb", type=int, default=1024, help="the oversized message")
    ap.add_argument("--kills", type=int, default=2, help="kill -9 trials per operation")
    ap.add_argument("--only", choices=("faults", "load", "fuzz", "attacks"), help="run one part")
    args = ap.parse_args()
    report: Dict[str, Any] = {}
    ok = True
    if args.only in (None, "faults"):
        print(f"== faults: kill -9 during localize, {args.faults} times", flush=True)
        report["faults"] = f = faults(args.faults)
        print(f"  {f['passed']}/{f['trials']} trials: typed error, no partial file, restarted backend serves; "
              f"error at most {f['max_error_after_s']} s after the kill (client timeout {f['timeout_s']} s)")
        for fail in f["failures"]:
            print(f"  FAILED: {fail}")
        ok &= f["passed"] == f["trials"]
    if args.only in (None, "load"):
        print(f"== load: {args.clients} clients x {args.requests} mixed requests", flush=True)
        report["load"] = ld = load(args.clients, args.requests)
        print(f"  {ld['replies']} replies, {ld['mismatched_or_failed']} mismatched or failed, "
              f"{ld['throughput_rps']} req/s")
        print(f"  latency ms p50 {ld['latency_ms'][50]}, p90 {ld['latency_ms'][90]}, p99 {ld['latency_ms'][99]}, "
              f"max {ld['latency_ms_max']}; backend peak RSS {ld['backend_peak_rss_mb']} MB")
        for p in ld["problems"]:
            print(f"  PROBLEM: {p}")
        ok &= ld["mismatched_or_failed"] == 0
    if args.only in (None, "fuzz"):
        print(f"== fuzz: {args.fuzz} malformed messages", flush=True)
        report["fuzz"] = fz = fuzz(args.fuzz)
        print(f"  unanswered {fz['unanswered']}, crashed {fz['crashed']}, serves after {fz['serves_after']}, "
              f"RSS {fz['rss_before_mb']} -> {fz['rss_after_mb']} MB, {fz['messages_per_s']} msg/s")
        print(f"  error codes: {fz['codes']}")
        ok &= fz["unanswered"] == 0 and not fz["crashed"]
    if args.only in (None, "attacks"):
        ok &= run_attacks(args, report)
    print("RESULT " + json.dumps(report, default=str))
    return 0 if ok else 1


def run_attacks(args: argparse.Namespace, report: Dict[str, Any]) -> bool:
    """Issue 11's attacks against one backend (tiny model, 64 MB message limit), then kill -9 during each op."""
    ok = True
    server = start_server(ATTACK_ARGS)
    try:
        print("== attacks (issue 11), one request each", flush=True)
        report["attacks"] = rows = attacks(server)
        for r in rows:
            good = r["code"] == r["expected"] and r["worker_alive"] and r["ping_ms"] is not None
            ok &= good
            print(f"  {'ok  ' if good else 'FAIL'} {r['attack']:48} -> {r['code']} in {r['ms']} ms; RSS "
                  f"{r['rss_mb'][0]} -> {r['rss_mb'][1]} MB; ping {r['ping_ms']} ms; worker alive {r['worker_alive']}")
        print(f"== {args.idle} idle connections (ZMTP handshake done, then silence)", flush=True)
        report["idle_connections"] = ic = idle_connections(args.idle, server)
        print(f"  opened {ic['connections_opened']} in {ic['open_s']} s; server CPU while they sit "
              f"{ic['server_cpu_percent_while_idle']} %; the server keeps {ic['server_keeps']} (cap "
              f"{ic['max_connections']}, {ic['evicted']} closed; scans every {ic['scan_interval_ms']} ms); a "
              f"newcomer's ping {ic['newcomer_ping_ms']} ms; "
              f"RSS {ic['rss_mb'][0]} -> {ic['rss_mb'][1]} MB; fd limit {ic['fd_limit']}")
        ok &= ic["newcomer_ping_ms"] is not None and ic["server_keeps"] <= ic["max_connections"]
        print(f"== a client that never reads: {args.unread} localize requests", flush=True)
        report["non_reading_client"] = nr = non_reading_client(args.unread, server=server)
        print(f"  {nr['requests']} replies of {nr['reply_mb_each']} MiB: {nr['replies_dropped']} dropped, "
              f"{nr['skipped_unread']} requests skipped (their client had stopped reading); RSS "
              f"{nr['rss_mb'][0]} -> peak {nr['rss_mb'][1]} MB; others' pings at most {nr['ping_ms_max']} ms "
              f"({nr['pings_unanswered']} unanswered); {nr['seconds']} s")
        ok &= nr["pings_unanswered"] == 0
        print(f"== a {args.message_mb} MB message against the 64 MB limit, by hand over ZMTP", flush=True)
        report["big_message"] = bm = big_message(args.message_mb, server)
        for shape, r in bm["shapes"].items():
            print(f"  {shape:30}: hung up after {r['sent_mb_before_hang_up']} MB ({r['after_ms']} ms); RSS "
                  f"{r['rss_mb'][0]} -> {r['rss_mb'][1]} MB (peak {r['peak_rss_mb']} MB)")
            ok &= r["hung_up"]
        print(f"  ping after: {bm['ping_ms']} ms")
        ok &= bm["ping_ms"] is not None
    finally:
        server.stop()
    print(f"== kill -9 of the backend during each operation, {args.kills} times each", flush=True)
    report["kill_each_op"] = kills = kill_each_op(args.kills)
    for r in kills:
        good = r["code"] in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT) and r["restarted_serves"]
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} {r['op']:9} trial {r['trial']}: {r['code']} "
              f"{r['error_after_s']} s after the kill; restarted backend serves: {r['restarted_serves']}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
