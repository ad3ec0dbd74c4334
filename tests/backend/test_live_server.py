"""A real backend subprocess: typed errors for bad input, and it keeps serving; the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import zmq
from PIL import Image

from backend.process import free_port, start_server
from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.client import Client

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def client(live_server):
    with Client(live_server.address, timeout=60, retries=0) as c:
        yield c


def test_info_says_the_weights_are_random(client):
    info = client.hello()
    assert info["model"]["name"] == "tiny" and info["model"]["random_weights"] is True
    assert info["device"]["type"] == "cpu" and info["warnings"]
    assert set(info["capabilities"]["class_presets"]) == {"aid", "resisc45", "eurosat", "ucm", "whu-rs19"}
    reply = client.classify(["river", "forest"], np.zeros((1, 32, 32, 3), np.uint8))
    assert any("RANDOM" in w for w in reply.result["warnings"])


@pytest.mark.parametrize("name,send,code", [
    ("wrong dtype", lambda c: c.classify(["a"], np.zeros((1, 8, 8, 3), np.float32)), ErrorCode.BAD_ARRAY),
    ("empty class list", lambda c: c.classify([], np.zeros((1, 8, 8, 3), np.uint8)), ErrorCode.BAD_PARAMS),
    ("NaN", lambda c: c.localize(np.zeros((8, 8, 3), np.uint8), ["q"], threshold=float("nan")), "nan"),
    ("canvas over the pixel limit", lambda c: c.localize(np.zeros((1001, 1000, 1), np.uint8), ["q"]),
     ErrorCode.TOO_LARGE),
    ("five channels", lambda c: c.classify(["a"], np.zeros((1, 8, 8, 5), np.uint8)), ErrorCode.BAD_ARRAY),
    ("unknown adapter", lambda c: c.classify(["a"], np.zeros((1, 8, 8, 3), np.uint8), adapter="nope"),
     ErrorCode.NOT_FOUND),
    ("empty image", lambda c: c.rank(np.zeros((1, 0, 8, 3), np.uint8), ["a"]), ErrorCode.BAD_ARRAY),
    ("rank without queries", lambda c: c.rank(np.zeros((1, 8, 8, 3), np.uint8), []), ErrorCode.BAD_PARAMS),
])
def test_bad_input_gets_a_typed_error_and_the_server_keeps_serving(client, name, send, code):
    if code == "nan":  # our client refuses to encode NaN; send the raw JSON a careless client would
        with pytest.raises(ValueError):
            send(client)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(client.address)
        sock.send_multipart([b'{"v":1,"op":"localize","id":"n1","params":{"queries":["q"],"threshold":NaN},'
                             b'"arrays":[]}'])
        assert sock.poll(10000)
        header = json.loads(sock.recv_multipart()[0])
        sock.close(0)
        assert header["status"] == "error" and header["error"]["code"] == ErrorCode.BAD_HEADER
    else:
        with pytest.raises(ProtocolError) as e:
            send(client)
        assert e.value.code == code, e.value
    assert client.ping()["pong"] is True


def test_oversized_arrays_are_refused_by_the_server_and_by_a_client_that_said_hello(live_server):
    canvas = np.zeros((5000, 5000, 3), np.uint8)  # 75 MB, over the server's 64 MiB
    with Client(live_server.address, timeout=60, retries=0) as fresh:
        with pytest.raises(ProtocolError) as e:
            fresh.localize(canvas, ["q"])
        assert e.value.code == ErrorCode.TOO_LARGE and e.value.details["limit"] == "max_array_bytes"
        fresh.hello()  # now the client knows the limits and does not even send
        fresh.close()
        with pytest.raises(ProtocolError) as e:
            fresh.localize(canvas, ["q"])
        assert e.value.code == ErrorCode.TOO_LARGE and "backend's limit" in e.value.message
        assert fresh._socket is None


def test_a_second_query_on_the_same_canvas_sends_only_its_id(client, rng, monkeypatch):
    canvas = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    sent = []
    request = client.request
    monkeypatch.setattr(client, "request", lambda op, params=None, arrays=None, **kw: sent.append(
        (params.get("canvas_id"), sorted(arrays or {}))) or request(op, params, arrays, **kw))
    first = client.localize(canvas, ["a river"], window_sizes=[64, 128], smooth=0)
    second = client.localize(canvas.copy(), ["a river"], window_sizes=[64, 128], smooth=0)
    assert sent == [(None, ["canvas"]), (first.result["canvas_id"], [])]
    np.testing.assert_array_equal(second.arrays["heatmaps"], first.arrays["heatmaps"])
    client.localize(canvas, ["a river"], window_sizes=[96], smooth=0)  # windows it never made: sent again
    assert sent[2:] == [(first.result["canvas_id"], []), (None, ["canvas"])]


def test_cli_ping(live_server):
    out = run_cli("ping", "--connect", live_server.address, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model"]["name"] == "tiny"
    dead = run_cli("ping", "--connect", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert dead.returncode != 0 and "did not answer" in dead.stderr


def test_cli_classify_rank_localize(live_server, tmp_path, data_dir):
    png = tmp_path / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png)
    tif = data_dir / "RGB.byte.tif"
    out = run_cli("classify", "--connect", live_server.address, "--class", "river", "--class", "forest",
                  "--json", str(png), str(tif))
    assert out.returncode == 0, out.stderr
    tiles = json.loads(out.stdout)["tiles"]
    assert [t["file"] for t in tiles] == [str(png), str(tif)]
    for t in tiles:
        assert set(t["probs"]) == {"river", "forest"} and abs(sum(t["probs"].values()) - 1) < 1e-5
        assert t["top"][0]["label"] == max(t["probs"], key=t["probs"].get)
    grid = run_cli("classify", "--connect", live_server.address, "--preset", "eurosat", "--grid", "256", "--json",
                   str(tif))
    assert grid.returncode == 0, grid.stderr
    grid_tiles = json.loads(grid.stdout)["tiles"]
    assert len(grid_tiles) == 4 * 3 and grid_tiles[0]["skipped"]  # a corner of the nodata collar
    assert all(len(t["probs"]) == 10 for t in grid_tiles if not t["skipped"]) and not grid_tiles[5]["skipped"]

    ranked = run_cli("rank", "--connect", live_server.address, "--text", "a river", "--json", str(png), str(tif))
    assert ranked.returncode == 0, ranked.stderr
    assert {m["file"] for m in json.loads(ranked.stdout)["by_text"][0]["top"]} == {str(png), str(tif)}

    heat = tmp_path / "heat.tif"
    loc = run_cli("localize", "--connect", live_server.address, "--query", "a river", "--out", str(heat),
                  "--window-sizes", "128", "256", "--smooth", "31", "--json", str(tif))
    assert loc.returncode == 0, loc.stderr
    with rasterio.open(tif) as src, rasterio.open(heat) as dst:
        assert dst.crs == src.crs and dst.transform == src.transform and dst.shape == src.shape
        h = dst.read(1)
        assert h.dtype == np.float32 and 0 <= np.nanmin(h) and np.nanmax(h) <= 1 and np.isnan(h[0, 0])  # collar
    assert not list(tmp_path.glob(".*.part"))  # written atomically
    ref = tmp_path / "heat_ref.npy"
    loc = run_cli("localize", "--connect", live_server.address, "--query", "a river", "--out", str(ref),
                  "--window-sizes", "128", "256", "--smooth", "31", "--selo-mode", "reference", "--json", str(tif))
    assert loc.returncode == 0, loc.stderr
    r = np.load(ref)
    ok = np.isfinite(r)  # the collar is nodata: blanked (NaN) in reference mode too
    assert r.shape == h.shape and np.isnan(r[0, 0]) and ok[np.isfinite(h)].all()
    assert np.allclose(r[ok] * 255, np.rint(r[ok] * 255), atol=1e-3)  # the reference's 8-bit map


def test_cli_errors_are_clear(live_server, tmp_path):
    out = run_cli("classify", "--connect", live_server.address, "--json", str(tmp_path / "missing.png"),
                  "--class", "a")
    assert out.returncode == 1 and "no such file" in out.stderr
    bad = run_cli("serve", "--model", "no-such-model", "--bind", f"tcp://127.0.0.1:{free_port()}")
    assert bad.returncode == 2 and "cannot start (model_error): unknown model" in bad.stderr
    # launchers (the plugin, the demo) read this exact marker to offer the fallback
    missing = run_cli("serve", "--offline", "--bind", f"tcp://127.0.0.1:{free_port()}",
                      env={"MAPQUERY_WEIGHTS": str(tmp_path), "HF_HOME": str(tmp_path / "hf")})
    assert missing.returncode == 2
    assert "backend: cannot start (weights_missing): no weights found for 'georsclip-vit-b-32'" in missing.stderr
    assert "RS5M_ViT-B-32.pt" in missing.stderr
    exposed = run_cli("serve", "--model", "tiny", "--random-weights", "--bind", f"tcp://0.0.0.0:{free_port()}")
    assert exposed.returncode == 2 and "token" in exposed.stderr
    presets = run_cli("presets", "--json")
    assert json.loads(presets.stdout)["default"] == "georsclip-vit-b-32"


def test_serve_with_a_token_on_all_interfaces():
    port = free_port()
    with start_server(["--model", "tiny", "--random-weights", "--token", "t0ken"], f"tcp://0.0.0.0:{port}"):
        with Client(f"tcp://127.0.0.1:{port}", token="t0ken", timeout=30) as c:
            assert c.hello()["server"]["auth"] is True
        with Client(f"tcp://127.0.0.1:{port}", token="guess", timeout=30, retries=0) as c:
            with pytest.raises(ProtocolError) as e:
                c.ping()
            assert e.value.code == ErrorCode.UNAUTHORIZED
