"""Settings storage, plain-words errors, the backend process manager."""
from __future__ import annotations

import sys
import time

import pytest

from shared_protocol import ErrorCode, ProtocolError

from qgis_plugin.backend_process import FAILED, READY, STOPPED, BackendProcess, start_and_wait
from qgis_plugin.connection import describe
from qgis_plugin.errors import PluginError, plain_message
from qgis_plugin.manager import BackendManager, is_loopback
from qgis_plugin.settings import Settings


class DictStore(dict):
    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value):  # noqa: N802
        self[key] = str(value)  # QgsSettings hands strings back on some platforms


def test_settings_round_trip_through_string_storage():
    s = Settings(mode="connect", address="tcp://10.0.0.5:6000", token="t0k", timeout_s=12.5, retries=3,
                 offline=False, heatmap_opacity=0.4)
    store = DictStore()
    s.save(store)
    assert Settings.load(store) == s


def test_serve_command_and_env():
    s = Settings(backend_python="/opt/py", backend_dir="/src", model="tiny", extra_args="--device cpu --random-weights",
                 address="tcp://127.0.0.1:7000", token="abc")
    assert s.serve_command() == ["/opt/py", "-m", "backend", "serve", "--bind", "tcp://127.0.0.1:7000", "--model",
                                 "tiny", "--offline", "--device", "cpu", "--random-weights"]
    env = s.backend_env()
    assert env["PYTHONPATH"].startswith("/src") and env["MAPQUERY_TOKEN"] == "abc"


@pytest.mark.parametrize("code, words", [
    (ErrorCode.TIMEOUT, "did not answer in time"), (ErrorCode.UNAVAILABLE, "not reachable"),
    (ErrorCode.UNAUTHORIZED, "token"), (ErrorCode.BUSY, "busy"), (ErrorCode.TOO_LARGE, "smaller area"),
    (ErrorCode.UNSUPPORTED_VERSION, "protocol version"), (ErrorCode.CANCELLED, "Cancelled")])
def test_plain_messages_by_code(code, words):
    msg = plain_message(ProtocolError(code, "raw technical text"), "Localize")
    assert msg.startswith("Localize: ") and words in msg
    assert "[" not in msg  # no '[code]' jargon


def test_plain_messages_keep_useful_details():
    msg = plain_message(ProtocolError(ErrorCode.BAD_PARAMS, "classify: 'classes' needs at least 1 item(s)"))
    assert "rejected" in msg and "needs at least 1" in msg
    assert plain_message(PluginError("choose a raster layer")) == "choose a raster layer"
    assert "Cannot read or write" in plain_message(PermissionError(13, "Permission denied", "/x"))


def test_describe_info():
    d = describe({"protocol": 1, "backend_version": "0.1", "model": {"name": "tiny", "arch": "tiny-vit",
                  "random_weights": True}, "device": {"type": "cpu", "name": "x86", "precision": "fp32"},
                  "adapters": [{"name": "lora1"}]})
    assert d["model"] == "tiny (tiny-vit)" and "random" in d["weights"] and d["adapters"] == "lora1"
    assert d["device"] == "cpu x86 fp32" and d["protocol"] == "1"


def test_backend_process_reports_missing_weights_plainly():
    script = ("import sys; print('loading ...'); "
              "print('backend: cannot start (weights_missing): no weights found for \\'georsclip-vit-b-32\\'; "
              "download them'); "
              "sys.exit(2)")
    proc = start_and_wait([sys.executable, "-c", script], timeout=20)
    assert proc.state() in (FAILED, STOPPED) and not proc.running
    assert proc.weights_missing()
    assert proc.failure_reason().startswith("no weights found for 'georsclip-vit-b-32'")


def test_backend_process_ready_and_stop():
    script = "import time; print('backend: ready on tcp://127.0.0.1:1', flush=True); time.sleep(60)"
    proc = start_and_wait([sys.executable, "-c", script], timeout=20)
    assert proc.state() == READY and proc.running
    t = time.monotonic()
    proc.stop()
    assert not proc.running and proc.state() == STOPPED and time.monotonic() - t < 5


def test_backend_process_with_a_missing_interpreter():
    proc = BackendProcess(["/nonexistent/python", "-m", "backend"]).start()
    assert proc.state() == FAILED and "cannot start" in proc.output[-1]


def test_manager_refuses_remote_bind_without_token():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("ipc:///tmp/x") and not is_loopback("tcp://0.0.0.0:1")
    m = BackendManager(Settings(address="tcp://0.0.0.0:5555", token=""))
    with pytest.raises(ValueError, match="token"):
        m.start()
    assert m.process is None  # refused before starting anything


def test_manager_starts_a_remote_bind_guarded_by_curve_keys_without_a_token(tmp_path):
    """--curve-keys in the extra arguments is a guard, as for the backend's own check: the plugin lets the
    backend start (it then fails for the missing key folder, which is the backend's message to show)."""
    m = BackendManager(Settings(address="tcp://0.0.0.0:5555", token="", extra_args=f"--curve-keys {tmp_path}/none",
                                backend_python="/nonexistent/python"))
    proc = m.start()
    assert proc.state() == FAILED
    m.stop()
    assert BackendManager(Settings(mode="connect")).process_state() == "external"
