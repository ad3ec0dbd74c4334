"""CURVE from the plugin's side: keys made with the backend's CLI, a live backend with --curve-keys, the plugin's
settings (server public key, client key) -> a working client; an unknown key -> a plain message, quickly."""
import subprocess
import time

import pytest

from mq_helpers import ROOT, backend_python, start_live_backend


def keys_cli(*args):
    return subprocess.run([backend_python(), "-m", "backend", "keys", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def curve_backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    for args in (["make", str(root / "server")], ["make", str(root / "client"), "--name", "qgis"],
                 ["make", str(root / "client"), "--name", "stranger"],
                 ["allow", str(root / "server"), str(root / "client" / "qgis.key")]):
        done = keys_cli(*args)
        assert done.returncode == 0, done.stderr
    proc, settings = start_live_backend(["--curve-keys", str(root / "server")])
    yield root, settings
    proc.stop()


def test_settings_with_the_right_keys_reach_the_backend(qgis_app, curve_backend):
    from qgis_plugin.connection import make_client, probe
    from qgis_plugin.settings import Settings
    root, started = curve_backend
    s = Settings(mode="connect", address=started.address, server_key=str(root / "server" / "server.key"),
                 client_key=str(root / "client" / "qgis.key_secret"), timeout_s=30, retries=0)
    store = {}

    class Store:
        def value(self, key, default=None):
            return store.get(key, default)

        def setValue(self, key, value):  # noqa: N802
            store[key] = str(value)
    s.save(Store())
    loaded = Settings.load(Store())
    assert loaded == s
    info = probe(loaded)
    assert info["server"]["curve"] is True
    with make_client(loaded) as c:
        assert c.embed(texts=["a river"]).arrays["text_embeddings"].shape[0] == 1


@pytest.mark.parametrize("client_key, words", [("stranger.key_secret", "allow-list"), ("", "secure handshake")])
def test_an_unknown_or_missing_key_gives_a_plain_message_quickly(qgis_app, curve_backend, client_key, words):
    from qgis_plugin.connection import probe
    from qgis_plugin.errors import plain_message
    from qgis_plugin.settings import Settings
    from shared_protocol import ErrorCode, ProtocolError
    root, started = curve_backend
    s = Settings(mode="connect", address=started.address, timeout_s=30, retries=0,
                 server_key=str(root / "server" / "server.key") if client_key else "",
                 client_key=str(root / "client" / client_key) if client_key else "")
    t = time.monotonic()
    with pytest.raises(ProtocolError) as e:
        probe(s, timeout=20)
    assert time.monotonic() - t < 10 and e.value.code == ErrorCode.UNAUTHORIZED
    assert words in plain_message(e.value)


def test_settings_dialog_keeps_the_keys(qgis_app):
    from qgis_plugin.settings import Settings
    from qgis_plugin.settings_dialog import SettingsDialog
    s = Settings(mode="connect", address="tcp://10.1.2.3:6000", server_key="/k/server.key",
                 client_key="/k/me.key_secret")
    assert SettingsDialog(s).settings() == s
