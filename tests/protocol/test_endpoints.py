"""The launcher, default address, token variable and loopback rule: one definition, used by every side."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared_protocol import endpoints as ep

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("address,loop", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.8.9.1:1", True), ("tcp://localhost:7", True),
    ("tcp://[::1]:5", True), ("ipc:///tmp/x", True), ("inproc://a", True),
    ("tcp://0.0.0.0:1", False), ("tcp://*:1", False), ("tcp://10.1.2.3:6000", False),
    ("tcp://example.org:5555", False), ("tcp://eth0:5555", False), ("udp://127.0.0.1:1", False),
    ("tcp://[::]:5", False),
])
def test_loopback_rule(address, loop):
    assert ep.is_loopback(address) is loop
    assert (ep.access_refusal(address, "", None) is None) is loop
    assert ep.access_refusal(address, "secret", None) is None and ep.access_refusal(address, None, "keys/") is None


@pytest.mark.parametrize("argv,keys", [
    (["py", "-m", "backend", "serve", "--curve-keys", "/k"], "/k"), (["serve", "--curve-keys=/k d"], "/k d"),
    (["serve", "--device", "cpu"], None), (["serve", "--curve-keys"], None),
])
def test_curve_keys_arg(argv, keys):
    assert ep.curve_keys_arg(argv) == keys


def test_default_address_is_a_loopback_tcp_address():
    assert ep.DEFAULT_ADDRESS == f"tcp://{ep.DEFAULT_HOST}:{ep.DEFAULT_PORT}" and ep.is_loopback(ep.DEFAULT_ADDRESS)
    assert ep.TOKEN_ENV in ep.token_refusal("tcp://0.0.0.0:1") and "0.0.0.0" in ep.token_refusal("tcp://0.0.0.0:1")


def test_free_port_is_bindable():
    port = ep.free_port()
    with socket.socket() as s:
        s.bind((ep.DEFAULT_HOST, port))
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", ep.free_address())


def test_serve_command_and_environment():
    assert ep.serve_command("/opt/py", "tcp://127.0.0.1:7000", ["--model", "tiny"]) == [
        "/opt/py", "-m", "backend", "serve", "--bind", "tcp://127.0.0.1:7000", "--model", "tiny"]
    base = {"PATH": "/bin", "PYTHONPATH": "/already"}
    env = ep.launch_env(base, source_dir="/src", token="t0k")
    assert env["PYTHONPATH"] == "/src" + os.pathsep + "/already" and env[ep.TOKEN_ENV] == "t0k"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/bin"
    assert base == {"PATH": "/bin", "PYTHONPATH": "/already"}  # not modified
    bare = ep.launch_env({"PATH": "/bin"})
    assert "PYTHONPATH" not in bare and ep.TOKEN_ENV not in bare
    assert ep.launch_env({}, source_dir="/src")["PYTHONPATH"] == "/src"


def test_status_lines_round_trip():
    assert ep.is_ready_line(ep.ready_line("tcp://127.0.0.1:1")) and not ep.is_ready_line("backend: loading")
    m = ep.CANNOT_START.search(ep.cannot_start_line("weights_missing", "no weights: look in /x"))
    assert m is not None and m.groups() == ("weights_missing", "no weights: look in /x")


def test_the_plugin_and_the_backend_use_these_definitions():
    """Same objects, not copies (QGIS's Python imports backend.server and the commands too: they need no torch)."""
    from backend import process, server
    from backend.commands import _common, serve
    from qgis_plugin import backend_process, manager, settings
    from shared_protocol import client
    assert server.is_loopback is ep.is_loopback and manager.is_loopback is ep.is_loopback
    assert _common.TOKEN_ENV is ep.TOKEN_ENV and _common.DEFAULT_ADDRESS is ep.DEFAULT_ADDRESS
    assert serve.TOKEN_ENV is ep.TOKEN_ENV and serve.DEFAULT_ADDRESS is ep.DEFAULT_ADDRESS
    assert server.DEFAULT_BIND is ep.DEFAULT_ADDRESS and client.DEFAULT_ADDRESS is ep.DEFAULT_ADDRESS
    assert settings.DEFAULT_ADDRESS is ep.DEFAULT_ADDRESS and settings.Settings().address == ep.DEFAULT_ADDRESS
    assert process.free_port is ep.free_port and backend_process.free_port is ep.free_port
    assert backend_process.CANNOT_START is ep.CANNOT_START
    s = settings.Settings(backend_python="/opt/py", backend_dir="/src", token="abc", model="tiny", offline=False)
    assert s.serve_command() == ep.serve_command("/opt/py", ep.DEFAULT_ADDRESS, ["--model", "tiny"])
    assert s.backend_env()[ep.TOKEN_ENV] == "abc" and s.backend_env()["PYTHONPATH"].startswith("/src")


def test_no_copies_left_in_the_sources():
    """The address, the token variable and the launcher's argv are spelled only in endpoints.py."""
    patterns = [re.compile(r"127\.0\.0\.1:5555"), re.compile(r"['\"]MAPQUERY_TOKEN['\"]"),
                re.compile(r"['\"]-m['\"],\s*['\"]backend['\"],\s*['\"]serve['\"]"),
                re.compile(r"def is_loopback|def free_port")]
    found = []
    for folder in ("backend", "qgis_plugin", "shared_protocol", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "endpoints.py":
                continue
            text = path.read_text(encoding="utf-8")
            found += [f"{path.relative_to(ROOT)}: {p.pattern}" for p in patterns if p.search(text)]
    assert not found, found


def test_the_backend_refuses_a_network_bind_without_a_token_by_that_rule():
    """``serve`` checks the bind with the shared rule before loading anything (no torch needed to refuse)."""
    from backend.server import Server, ServerConfig, Service
    with pytest.raises(ValueError, match=ep.TOKEN_ENV):
        Server(Service(), ServerConfig(bind=f"tcp://0.0.0.0:{ep.free_port()}"))


def test_launch_env_reaches_the_child():
    env = ep.launch_env({"PATH": os.environ.get("PATH", "")}, source_dir=str(ROOT), token="xyz")
    code = f"import os, backend; print(os.environ[{ep.TOKEN_ENV!r}], backend.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd="/")
    assert out.returncode == 0, out.stderr
    token, path = out.stdout.split()
    assert token == "xyz" and Path(path).resolve().parent == (ROOT / "backend").resolve()
