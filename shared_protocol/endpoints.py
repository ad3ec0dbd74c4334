"""Where the backend listens and how it is launched: written once, used by the backend, the plugin and the tests.

- :data:`DEFAULT_ADDRESS`: the address a backend binds and a client connects to by default (loopback).
- :data:`TOKEN_ENV`: the environment variable holding the access token (read by ``serve`` and the clients).
- :func:`is_loopback` / :func:`access_refusal`: a bind that can be reached from the network needs CURVE keys
  or a token.
- :func:`serve_command` / :func:`launch_env`: ``python -m backend serve ...`` with the environment it needs
  (``PYTHONPATH`` naming the folder that holds ``backend/`` and ``shared_protocol/``, unbuffered output,
  the token).
- :data:`READY_MARK` and :data:`CANNOT_START`: the lines a launcher reads on the backend's output to know
  that it is ready (``backend: ready on ADDRESS``) or why it could not start
  (``backend: cannot start (REASON): MESSAGE``).

Pure standard library: QGIS's Python imports this too.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Dict, List, Mapping, Optional, Sequence

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5555
DEFAULT_ADDRESS = f"tcp://{DEFAULT_HOST}:{DEFAULT_PORT}"
TOKEN_ENV = "MAPQUERY_TOKEN"
BACKEND_MODULE = "backend"  # run as ``python -m backend``
READY_MARK = "ready on"
CANNOT_START = re.compile(r"cannot start(?: \((\w+)\))?: (.*)")


def is_loopback(address: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and ``tcp://`` addresses on the loopback interface.

    ``*``, ``0.0.0.0``, interface names and host names other than ``localhost`` may reach the network.
    """
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_refusal(address: str, token: Optional[str], curve_keys: Optional[str]) -> Optional[str]:
    """Why a backend may not bind ``address`` guarded by ``token`` and ``curve_keys`` (a key folder), or None:
    an address reachable from the network needs one of them (the backend's check and the plugin's, before it
    starts one)."""
    if is_loopback(address) or curve_keys or token:
        return None
    return token_refusal(address)


def token_refusal(address: str) -> str:
    """The message for a non-loopback bind with neither CURVE keys nor a token."""
    return (f"refusing to bind {address} without access control: a non-loopback address is reachable from the "
            f"network. Use --curve-keys DIR (encrypted, allow-listed clients), or pass --token (or set "
            f"{TOKEN_ENV}) on a trusted network, or bind tcp://{DEFAULT_HOST}")


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port free on ``host`` right now (for tests and throw-away backends)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_address(host: str = DEFAULT_HOST) -> str:
    return f"tcp://{host}:{free_port(host)}"


def serve_command(python: str, bind: str = DEFAULT_ADDRESS, args: Sequence[str] = ()) -> List[str]:
    """The argv that starts a backend serving on ``bind``: ``PYTHON -m backend serve --bind BIND ARGS``."""
    return [python, "-m", BACKEND_MODULE, "serve", "--bind", bind, *args]


def curve_keys_arg(argv: Sequence[str]) -> Optional[str]:
    """The ``--curve-keys DIR`` (or ``--curve-keys=DIR``) of a ``serve`` argv, else None."""
    for i, arg in enumerate(argv):
        if arg == "--curve-keys" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--curve-keys="):
            return arg.split("=", 1)[1]
    return None


def launch_env(base: Optional[Mapping[str, str]] = None, source_dir: str = "", token: str = "") -> Dict[str, str]:
    """The environment for :func:`serve_command`: ``base`` (default: this process's) plus unbuffered output,
    ``source_dir`` first on ``PYTHONPATH`` (when the backend is not installed in that Python) and the token."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if token:
        env[TOKEN_ENV] = token
    if source_dir:
        rest = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = source_dir + (os.pathsep + rest if rest else "")
    return env


def is_ready_line(line: str) -> bool:
    return READY_MARK in line


def ready_line(endpoint: str) -> str:
    return f"backend: {READY_MARK} {endpoint}"


def cannot_start_line(reason: str, message: str) -> str:
    return f"backend: cannot start ({reason}): {message}"
