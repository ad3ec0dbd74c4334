"""Issue 11 against a real backend subprocess and the backend's own pieces: each test reproduces one attack."""
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
import zmq

from backend.budget import selo_window_count
from backend.fuzz import ATTACKS
from backend.process import free_port, start_server
from backend.tasks.windows import selo_windows
from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.client import Client

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
BUDGET_MB = 1024


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def server():
    """stdout is a pipe here, as when the project or the plugin starts the backend (the +init=fd/1 hang)."""
    srv = start_server(["--model", "tiny", "--random-weights", "--device", "cpu", "--memory-budget-mb",
                        str(BUDGET_MB), "--max-array-mb", "64"])
    yield srv
    srv.stop()


def send_raw(address, frames, wait_s=20.0):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    t = time.monotonic()
    sock.send_multipart(frames)
    got = sock.poll(int(wait_s * 1000))
    header = json.loads(sock.recv_multipart()[0]) if got else None
    sock.close()
    return header, time.monotonic() - t


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_gets_its_typed_error_and_the_server_keeps_serving(server, name):
    frames, code = ATTACKS[name]
    header, elapsed = send_raw(server.address, frames)
    assert header is not None, f"{name}: no answer (the server hangs)"
    assert header["status"] == "error" and header["error"]["code"] == code, header
    assert elapsed < 10
    with Client(server.address, timeout=10, retries=0) as c:
        assert c.ping()["pong"] is True
        assert c.embed(texts=["still working"]).arrays["text_embeddings"].shape[0] == 1  # the worker lives


def test_info_reports_the_memory_budget_and_ordinary_requests_fit(server, rng):
    with Client(server.address, timeout=60, retries=0) as c:
        info = c.info()
        assert info["capabilities"]["memory_budget_bytes"] == BUDGET_MB << 20
        assert info["server"]["fd_limit"] >= 1024 and info["server"]["worker_alive"] is True
        heat = c.localize(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), ["q"], window_sizes=[64, 128],
                          smooth=0, crs="EPSG:32618").arrays["heatmaps"]
        assert heat.shape == (1, 300, 300)
        with pytest.raises(ProtocolError) as e:  # the same canvas at crop_size 4096: refused before any work
            c.localize(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), ["q"], window_sizes=[64, 128],
                       smooth=0, crop_size=4096)
        assert e.value.code == ErrorCode.TOO_LARGE and e.value.details["limit"] == "memory_budget_bytes"
        assert e.value.details["term"] == "windows in flight"


def test_a_crs_is_parsed_in_each_accepted_form_and_never_through_a_file(monkeypatch):
    import pyproj
    from rasterio.crs import CRS
    from backend.tasks import geo

    class OnlySafeParsers:  # what parse_crs may call; from_user_input/from_string hand files to PROJ
        from_authority = staticmethod(CRS.from_authority)
        from_wkt = staticmethod(CRS.from_wkt)
    monkeypatch.setattr(geo, "CRS", OnlySafeParsers)
    wkt = pyproj.CRS.from_epsg(32618).to_wkt()
    for text in ("EPSG:32618", "epsg:32618", wkt, pyproj.CRS.from_epsg(32618).to_json()):
        assert geo.parse_crs(text).to_epsg() == 32618
    assert geo.parse_crs("OGC:CRS84").to_string() == "OGC:CRS84"
    for bad in ("+init=/proc/self/fd/0:x", "+init=epsg:4326", "/etc/passwd", "+proj=longlat +datum=WGS84",
                'GEOGCS["x",EXTENSION["PROJ4","+init=/proc/self/fd/0:x"]]', "EPSG:4326 /dev/stdin", "{]"):
        with pytest.raises(ProtocolError) as e:
            geo.parse_crs(bad)
        assert e.value.code == ErrorCode.BAD_PARAMS


def test_the_window_count_bound_holds():
    for h, w in ((1, 1), (100, 37), (777, 1024), (2048, 2048)):
        for sizes in ([256], [256, 512, 768], [8, 100]):
            assert selo_window_count(h, w, sizes) >= sum(len(selo_windows(h, w, s)) for s in sizes)


def test_class_embedding_work_honours_cancel(engine):
    from backend.tasks.classify import class_vectors
    calls = []

    def progress(fraction, message):
        calls.append(fraction)
        if len(calls) == 3:
            raise ProtocolError(ErrorCode.CANCELLED, "cancelled")
    with pytest.raises(ProtocolError):
        class_vectors(engine, [f"class {i}" for i in range(200)], {"templates": "georsclip"}, progress)
    assert len(calls) == 3  # stopped at the third class, not after 200


def test_a_long_class_list_is_cancelled_promptly_on_a_live_server(server):
    cancel = threading.Event()
    classes = [f"class number {i}" for i in range(2000)]
    with Client(server.address, timeout=120, retries=0) as c:
        threading.Timer(1.0, cancel.set).start()
        t = time.monotonic()
        with pytest.raises(ProtocolError) as e:
            c.classify(classes, np.zeros((1, 32, 32, 3), np.uint8), cancel=cancel)
        assert e.value.code == ErrorCode.CANCELLED and time.monotonic() - t < 8
        assert c.ping()["pong"] is True


def special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.tif"
    link.symlink_to(target)
    out = {"fifo": fifo, "symlink": link, "folder": tmp_path}
    if os.geteuid() == 0:
        dev = tmp_path / "null"
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        out["device"] = dev
    return out, target


def test_the_atomic_writer_never_replaces_a_special_file(tmp_path):
    from backend.files import atomic_write
    specials, target = special_files(tmp_path)
    for kind, path in specials.items():
        before = os.lstat(path)
        with pytest.raises(ValueError):
            atomic_write(path, b"data")
        after = os.lstat(path)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino, kind
    assert target.read_text() == "keep me" and not list(tmp_path.glob(".*.part"))
    atomic_write(tmp_path / "plain.bin", b"x")  # absent or regular: fine
    atomic_write(tmp_path / "plain.bin", b"y")
    assert (tmp_path / "plain.bin").read_bytes() == b"y"


def test_cli_out_and_polygons_refuse_special_files_before_any_work(tmp_path):
    from PIL import Image
    specials, target = special_files(tmp_path)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    dead = f"tcp://127.0.0.1:{free_port()}"
    for flag in ("--out", "--polygons"):
        for kind in ("fifo", "symlink"):
            done = run_cli("localize", "--connect", dead, "--timeout", "30", "--query", "q", flag,
                           str(specials[kind]), str(image))
            assert done.returncode == 1 and "refusing to replace" in done.stderr and "Traceback" not in done.stderr
    assert stat.S_ISFIFO(os.lstat(specials["fifo"]).st_mode) and target.read_text() == "keep me"


def tiff_declaring(path, width, height):
    """A 135-byte-class TIFF whose header declares width x height 8-bit pixels (no pixel data)."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
        for tag, typ, count, value in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd)
    return path


def png_bomb(path, width, height):
    """A small PNG whose IHDR declares width x height; its IDAT is a few zero rows of deflate."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width * 3 + 1) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("make", [lambda p: tiff_declaring(p / "bomb.tif", 40000, 40000),
                                  lambda p: png_bomb(p / "bomb.png", 40000, 40000),
                                  lambda p: png_bomb(p / "bomb2.png", 17000, 17000)])
def test_decompression_bombs_get_a_clear_error_not_a_traceback(tmp_path, make):
    from backend.files import read_image
    path = make(tmp_path)
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match="refused"):
        read_image(path)
    done = run_cli("classify", "--connect", f"tcp://127.0.0.1:{free_port()}", "--timeout", "5", "--class", "a",
                   str(path))
    assert done.returncode == 1 and "refused" in done.stderr and "Traceback" not in done.stderr


def test_an_adapter_header_with_impossible_sizes_is_refused_before_allocating(tiny, tmp_path):
    from backend.adapters import AdapterError, build_adapter, load_adapter, save_adapter
    path = save_adapter(tmp_path / "lora.pt", build_adapter("lora", tiny).eval())
    payload = torch.load(path, weights_only=True)
    payload["header"]["config"]["r"] = 20_000_000
    torch.save(payload, tmp_path / "evil.pt")
    t = time.monotonic()
    with pytest.raises(AdapterError) as e:
        load_adapter(tmp_path / "evil.pt", tiny)
    assert e.value.details["reason"] == "bad_adapter" and e.value.details["setting"] == "r"
    assert time.monotonic() - t < 5
    payload["header"]["config"]["r"] = 8
    payload["header"]["config"]["layers"] = [0, 10**9]
    torch.save(payload, tmp_path / "evil2.pt")
    with pytest.raises(AdapterError):
        load_adapter(tmp_path / "evil2.pt", tiny)
    assert load_adapter(path, tiny) is not None  # an honest header still loads


def test_info_shows_adapter_paths_to_local_clients_only(engine):
    from backend.server import peer_is_local
    from backend.service import ModelService
    meta = {"path": "/home/me/secret/runs/a.pt", "method": "gdpl",
            "config": {"domain_checkpoint": "/home/me/secret/dom.pt", "n_ctx": 2}}
    service = ModelService(engine, adapter_info={"a": meta})
    assert service.info(remote=False)["adapters"][0]["path"] == meta["path"]
    remote = json.dumps(service.info(remote=True)["adapters"])
    assert "/home/me" not in remote and "dom.pt" in remote

    class Frame:
        def __init__(self, address):
            self.address = address

        def get(self, key):
            return self.address
    tcp = "tcp://0.0.0.0:5555"
    assert not peer_is_local(tcp, Frame("192.168.1.20")) and peer_is_local(tcp, Frame("127.0.0.1"))
    assert peer_is_local(tcp, Frame("::1"))
    assert not peer_is_local(tcp, object())  # no peer address on TCP: counted as remote
    assert peer_is_local("ipc:///tmp/mapquery.sock", object())  # ipc is this machine


def test_example_counts_in_a_header_are_bounded_on_their_own(tiny):
    """An instant adapter's cache size counts examples, not widths: a real cache passes, a header claiming an
    absurd one is refused before anything is allocated."""
    from backend.adapters import AdapterError
    from backend.adapters.base import COUNT_LIMITS, check_config_sizes
    check_config_sizes({"classes": ["a", "b"], "n_cache": 96}, tiny)
    with pytest.raises(AdapterError) as e:
        check_config_sizes({"classes": ["a", "b"], "n_cache": COUNT_LIMITS["n_cache"] + 1}, tiny)
    assert e.value.details["setting"] == "n_cache"


def test_keys_cli_then_curve_serve_then_clients(tmp_path):
    for args in (["make", str(tmp_path / "srv")], ["make", str(tmp_path / "cl"), "--name", "field"],
                 ["make", str(tmp_path / "cl"), "--name", "other"],
                 ["allow", str(tmp_path / "srv"), str(tmp_path / "cl" / "field.key")]):
        done = run_cli("keys", *args)
        assert done.returncode == 0, done.stderr
    listing = json.loads(run_cli("keys", "list", str(tmp_path / "srv"), "--json").stdout)
    assert [c["name"] for c in listing["allowed_clients"]] == ["field"]
    assert oct(os.stat(tmp_path / "srv" / "server.key_secret").st_mode & 0o777) == "0o600"
    srv = start_server(["--model", "tiny", "--random-weights", "--device", "cpu", "--curve-keys",
                        str(tmp_path / "srv")])
    try:
        assert any("CURVE on, 1 allowed" in line for line in srv.output)
        server_key = str(tmp_path / "srv" / "server.key")
        ok = run_cli("ping", "--connect", srv.address, "--server-key", server_key, "--client-key",
                     str(tmp_path / "cl" / "field.key_secret"), "--json")
        assert ok.returncode == 0 and json.loads(ok.stdout)["server"]["curve"] is True
        t = time.monotonic()
        refused = run_cli("ping", "--connect", srv.address, "--server-key", listing["server_public_key"],
                          "--client-key", str(tmp_path / "cl" / "other.key_secret"))
        assert refused.returncode == 1 and "allow-list" in refused.stderr and time.monotonic() - t < 15
        plain = run_cli("ping", "--connect", srv.address)
        assert plain.returncode == 1 and "CURVE" in plain.stderr
    finally:
        srv.stop()


def test_a_network_bind_needs_curve_or_a_token(tmp_path):
    done = run_cli("serve", "--model", "tiny", "--random-weights", "--bind", f"tcp://0.0.0.0:{free_port()}",
                   timeout=60)
    assert done.returncode == 2 and "MAPQUERY_TOKEN" in done.stderr and "--curve-keys" in done.stderr


PEAK_SCRIPT = """
import sys, numpy as np
from backend.models import load_model
from backend.engine import Engine, EngineConfig
from backend.service import ModelService
from backend.tasks import localize as L
from shared_protocol import Request
crop, side = int(sys.argv[1]), int(sys.argv[2])
loaded = load_model("tiny", random_weights=True, device="cpu")
eng = Engine(loaded, EngineConfig(precision="fp32", cache_bytes=0))
canvas = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
params = {"queries": ["q"], "window_sizes": [256, 512, 768], "crop_size": crop, "smooth": 0, "normalize": True,
          "value_range": None, "adapter": None, "canvas_id": None}
from backend.budget import check_budget  # budget 0: no check, the estimate is returned
est = check_budget("localize", params, {"canvas": canvas.shape}, ModelService(eng).model_shape(), 0)
def status(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to today's RSS: earlier peaks do not hide ours
base = status("VmRSS:")
L.localize(eng, L.resolve_canvas(eng, canvas, params), params, lambda p, m: None)
print(status("VmHWM:") - base, est)
"""


def test_the_peak_memory_estimate_bounds_the_measured_peak():
    """A localize run in a fresh process: its peak RSS growth stays under the estimate that admits it."""
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "768", "768"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    measured, estimate = map(int, done.stdout.split()[-2:])
    assert measured > 100 << 20  # the crops did cost memory: the comparison means something
    assert measured <= estimate, (measured >> 20, estimate >> 20)
