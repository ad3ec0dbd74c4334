"""CURVE (Ironhouse) end to end with the in-process server: allowed keys work, others get a clear error."""
import socket
import time

import numpy as np
import pytest
import zmq

from backend.curve import allow_client, init_server_folder, list_keys, make_keypair
from backend.server import ServerConfig, check_access
from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.client import Client
from stubs import running_server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keys(tmp_path):
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    server_public, _ = init_server_folder(server_dir)
    _, alice_secret = make_keypair(client_dir, "alice")
    allow_client(server_dir, str(client_dir / "alice.key"))
    _, mallory_secret = make_keypair(client_dir, "mallory")  # a valid keypair nobody allowed
    return {"dir": str(server_dir), "server_public": str(server_public), "alice": str(alice_secret),
            "mallory": str(mallory_secret)}


def test_an_allowed_client_key_works_and_traffic_is_encrypted(keys):
    addr = f"tcp://127.0.0.1:{free_port()}"
    with running_server(addr, curve_keys=keys["dir"]) as server:
        with Client(addr, timeout=5, retries=0, server_public_key=keys["server_public"],
                    client_secret_file=keys["alice"]) as c:
            info = c.hello()
            assert info["server"]["curve"] is True and info["server"]["curve_clients"] == 1
            reply = c.classify(["a"], np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3), top_k=1)
            np.testing.assert_array_equal(reply.arrays["tiles"].ravel(), np.arange(12))
        assert server.info()["server"]["auth"] is True


@pytest.mark.parametrize("who", ["unknown client key", "no CURVE at all", "wrong server key"])
def test_other_clients_get_a_clear_error_quickly_not_a_hang(keys, who):
    addr = f"tcp://127.0.0.1:{free_port()}"
    kwargs = {"unknown client key": dict(server_public_key=keys["server_public"], client_secret_file=keys["mallory"]),
              "no CURVE at all": {},
              "wrong server key": dict(server_public_key=zmq.curve_keypair()[0], client_secret_file=keys["alice"])}
    with running_server(addr, curve_keys=keys["dir"]):
        with Client(addr, timeout=30, retries=2, **kwargs[who]) as c:
            t = time.monotonic()
            with pytest.raises(ProtocolError) as e:
                c.ping()
            assert time.monotonic() - t < 10
        if who == "wrong server key":  # the server cannot even read the client's hello: no detail comes back
            assert e.value.code in (ErrorCode.UNAUTHORIZED, ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE)
        else:
            assert e.value.code == ErrorCode.UNAUTHORIZED, e.value
            assert ("allow-list" if who == "unknown client key" else "CURVE") in e.value.message


def test_a_key_allowed_while_the_server_runs_is_taken_within_seconds(keys, tmp_path):
    addr = f"tcp://127.0.0.1:{free_port()}"
    _, bob_secret = make_keypair(tmp_path / "bob", "bob")
    with running_server(addr, curve_keys=keys["dir"]):
        allow_client(keys["dir"], str(tmp_path / "bob" / "bob.key"))
        deadline = time.monotonic() + 10
        while True:
            try:
                with Client(addr, timeout=2, retries=0, server_public_key=keys["server_public"],
                            client_secret_file=str(bob_secret)) as c:
                    assert c.ping()["pong"] is True
                break
            except ProtocolError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
    assert [c["name"] for c in list_keys(keys["dir"])["allowed_clients"]] == ["alice", "bob"]


def test_a_network_bind_needs_curve_or_a_token_and_a_token_alone_warns(keys):
    with pytest.raises(ValueError, match="MAPQUERY_TOKEN"):
        check_access(ServerConfig(bind="tcp://0.0.0.0:5555"))
    assert "clear" in check_access(ServerConfig(bind="tcp://0.0.0.0:5555", token="t"))
    assert check_access(ServerConfig(bind="tcp://0.0.0.0:5555", curve_keys=keys["dir"])) is None
    assert check_access(ServerConfig(bind="tcp://127.0.0.1:5555")) is None
