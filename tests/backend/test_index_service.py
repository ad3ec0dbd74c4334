"""The index over the protocol (a live backend: loopback and remote clients, --data-dir), the CLI, and a real
``kill -9`` of a build."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.client import Client
from backend.index.build import build_index
from backend.index.layout import IndexStore, WindowSettings
from backend.index.query import Query, query_vector, search
from backend.server import peer_is_local
from index_helpers import CROP, SIZES, engine_from, expected_windows, tiny_checkpoint, write_raster

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = WindowSettings(SIZES, CROP, 0.5)
TOKEN = "index-test-token"


def _lan_ip():
    """This machine's address on a non-loopback interface, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    ckpt = tiny_checkpoint(d / "tiny.pt")
    (d / "data").mkdir()
    raster = write_raster(d / "data" / "a.tif", seed=21)
    outside = write_raster(d / "b.tif", seed=22)
    return d, ckpt, raster, outside


@pytest.fixture(scope="module")
def server(setup):
    from backend.process import free_port, start_server
    d, ckpt, _, _ = setup
    port = free_port()
    srv = start_server(["--model", "tiny", "--checkpoint", str(ckpt), "--device", "cpu", "--precision", "fp32",
                        "--token", TOKEN, "--data-dir", str(d / "data")], address=f"tcp://0.0.0.0:{port}")
    srv.port = port
    yield srv
    srv.stop()


def test_peer_is_local():
    class Frame:
        def __init__(self, address):
            self.address = address

        def get(self, key):
            assert key == "Peer-Address"
            if self.address is None:
                raise KeyError(key)
            return self.address

    assert peer_is_local("ipc:///tmp/x", Frame(None))
    assert peer_is_local("tcp://0.0.0.0:5555", Frame("127.0.0.1")) and peer_is_local("tcp://*:1", Frame("::1"))
    assert not peer_is_local("tcp://0.0.0.0:5555", Frame("192.0.2.7"))
    assert not peer_is_local("tcp://0.0.0.0:5555", Frame(None))


def test_loopback_client_builds_and_searches_like_in_process(server, setup, tmp_path):
    d, ckpt, raster, outside = setup
    eng = engine_from(ckpt)
    with Client(f"tcp://127.0.0.1:{server.port}", token=TOKEN, timeout=300, retries=0) as c:
        seen = []
        rep = c.request("index_build", {"index": str(tmp_path / "i"), "rasters": [str(raster), str(outside)],
                                        "window_sizes": list(SIZES), "crop_size": CROP},
                        on_progress=lambda f, m: seen.append(f)).result
        assert rep["name"] == "i" and rep["rows"] > 0 and seen
        listed = c.request("index_info", {}).result["indexes"]
        assert [i["name"] for i in listed] == ["i"]
        info = c.request("index_info", {"index": "i"}).result
        assert info["queryable"] and info["windows"]["sizes"] == list(SIZES) and len(info["rasters"]) == 2
        chip = np.ascontiguousarray(
            __import__("rasterio").open(raster).read([1, 2, 3], window=((60, 124), (20, 84))).transpose(1, 2, 0))
        reply = c.request("index_search", {"index": "i", "texts": ["a lake"], "top_k": 7, "surface": True},
                          {"images": chip[None]})
    store = IndexStore.open(tmp_path / "i")
    q = query_vector(eng, store, Query(texts=["a lake"], chips=[chip]))
    np.testing.assert_allclose(reply.arrays["query_vector"], q.vector, atol=1e-5)
    want = search(store, q.vector, 7)
    assert [r["id"] for r in reply.result["rows"]] == [r["id"] for r in want]
    keys = [(str(p),) + k for p in (raster, outside) for k in expected_windows(eng, p)]
    assert {(r["raster"], r["size"], *r["window"]) for r in reply.result["rows"]} <= set(keys)
    surfaces = {s["raster"]: s["array"] for s in reply.result["surfaces"]}
    assert sorted(surfaces) == sorted([str(raster), str(outside)])
    from rasterio.io import MemoryFile
    with MemoryFile(reply.arrays[surfaces[str(raster)]].tobytes()) as mem, mem.open() as ds:
        assert ds.shape == (150, 190) and ds.crs.to_epsg() == 32618


def test_remote_client_only_names_paths_under_data_dirs(server, setup):
    d, _, raster, outside = setup
    ip = _lan_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback interface to connect through")
    with Client(f"tcp://{ip}:{server.port}", token=TOKEN, timeout=300, retries=0) as c:
        for params in ({"index": str(d / "elsewhere"), "rasters": [str(raster)]},
                       {"index": str(d / "data" / "j"), "rasters": [str(outside)]},
                       {"index": str(d / "data" / ".." / "k"), "rasters": [str(raster)]}):
            with pytest.raises(ProtocolError) as err:
                c.request("index_build", {**params, "window_sizes": list(SIZES), "crop_size": CROP})
            assert err.value.code == ErrorCode.UNAUTHORIZED and err.value.details["reason"] == "outside_data_dirs"
        rep = c.request("index_build", {"index": "j", "rasters": ["a.tif"], "window_sizes": list(SIZES),
                                        "crop_size": CROP}).result  # relative: under the first data folder
        assert rep["index"] == str(d / "data" / "j") and rep["rows"] > 0
        names = [i["name"] for i in c.request("index_info", {}).result["indexes"]]
        assert "j" in names and "i" not in names  # an index a local client opened elsewhere is not listed
        with pytest.raises(ProtocolError) as err:
            c.request("index_search", {"index": "i", "texts": ["x"]})
        assert err.value.code == ErrorCode.UNAUTHORIZED


def test_cli_build_search_export(server, setup, tmp_path):
    d, ckpt, raster, _ = setup
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    model = ["--model", "tiny", "--checkpoint", str(ckpt), "--device", "cpu", "--precision", "fp32"]

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "backend", "index", *args], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    built = cli("build", "--out", str(tmp_path / "i"), "--window-sizes", *map(str, SIZES), "--crop-size", str(CROP),
                "--json", *model, str(raster))
    assert built["rasters"][0]["status"] == "new"
    import pyogrio.raw
    import shapely
    box = shapely.box(500000 + 30 * 60, 4200000 - 30 * 110, 500000 + 30 * 100, 4200000 - 30 * 70)
    pyogrio.raw.write(str(tmp_path / "ex.gpkg"), np.array([shapely.to_wkb(box)], dtype=object), [], [],
                      driver="GPKG", geometry_type="Polygon", crs="EPSG:32618")
    found = cli("search", str(tmp_path / "i"), "--examples", str(tmp_path / "ex.gpkg"), "--text", "a road",
                "--top-k", "4", "--json", "--connect", f"tcp://127.0.0.1:{server.port}", "--token", TOKEN,
                "--gpkg", str(tmp_path / "hits.gpkg"))
    eng = engine_from(ckpt)
    store = IndexStore.open(tmp_path / "i")
    q = query_vector(eng, store, Query(texts=["a road"], examples=[shapely.geometry.mapping(box)], crs="EPSG:32618"))
    want = search(store, q.vector, 4, exclude=q.example_ids)
    assert [(r["raster"], r["window"]) for r in found["rows"]] == [(r["raster"], r["window"]) for r in want]
    np.testing.assert_allclose([r["score"] for r in found["rows"]], [r["score"] for r in want], atol=1e-5)
    assert set(found["rows"][0]) >= {"raster", "window", "footprint", "score"}
    meta, _, geoms, fields = pyogrio.raw.read(str(tmp_path / "hits.gpkg"))[:4]
    assert len(geoms) == 4 and list(fields[0]) == [1, 2, 3, 4]
    exported = cli("export", str(tmp_path / "i"), "--out", str(tmp_path / "w.parquet"), "--json")
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "w.parquet")
    geo = json.loads(table.schema.metadata[b"geo"])
    assert exported["rows"] == table.num_rows == store.row_count() and geo["primary_column"] == "geometry"
    assert shapely.from_wkb(table["geometry"][0].as_py()).geom_type == "Polygon" and "vector" not in table.columns


BUILD_SCRIPT = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from backend.index.build import build_index
from backend.index.layout import WindowSettings
from index_helpers import engine_from
build_index(engine_from({ckpt!r}), {out!r}, [{raster!r}], WindowSettings({sizes!r}, {crop}, 0.5),
            progress=lambda f, m: time.sleep(0.3), commit_rows=8)
"""


def test_kill_9_during_a_build_loses_at_most_a_batch_and_a_rerun_finishes(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    raster = write_raster(tmp_path / "big.tif", height=260, width=300, seed=23)
    out = tmp_path / "i"
    script = BUILD_SCRIPT.format(root=str(ROOT), tests=str(Path(__file__).parent), ckpt=str(ckpt), out=str(out),
                                 raster=str(raster), sizes=SIZES, crop=CROP)
    versions = out / "windows.lance" / "_versions"
    counts = []
    for commits in (2, 5):  # killed twice: after some commits, and again after more
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if versions.is_dir() and len(list(versions.glob("*.manifest"))) >= commits + 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        store = IndexStore.open(out)
        ids = store.scan(None, ["id"])["id"].to_pylist()
        assert len(ids) == len(set(ids)) and not store.raster_rows()  # no duplicates, not marked complete
        counts.append(len(ids))
    eng = engine_from(ckpt)
    rep = build_index(eng, out, [str(raster)])
    assert rep["rasters"][0]["status"] == "resumed" and 0 < counts[0] <= counts[1] < rep["rows"]
    stored = IndexStore.open(out).scan(None, ["id", "size", "col", "row", "width", "height", "vector"]).to_pylist()
    assert len({r["id"] for r in stored}) == len(stored)
    want = expected_windows(eng, raster)
    got = {(r["size"], r["col"], r["row"], r["width"], r["height"]): np.array(r["vector"]) for r in stored}
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=2e-5)
