"""CURVE keys (ZeroMQ's encryption and authentication; the zguide's "Ironhouse" pattern), as both sides use them.

The server has a keypair; each client has its own. A client pins the server's public key and presents its own
keypair; the server accepts only the client public keys in its allow-list folder. Keys are ZeroMQ certificate
files (``NAME.key``: public, ``NAME.key_secret``: public and secret; ``zmq.auth`` reads and writes them) or, for
a public key, its 40 Z85 characters. A server's key folder (``serve --curve-keys DIR``) holds
``server.key_secret`` and the allow-list ``clients/*.key`` (``python -m backend keys`` makes and lists them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

SERVER_KEY_NAME = "server"
CLIENTS_FOLDER = "clients"
Z85_KEY_LEN = 40

KeyText = Union[str, bytes]


def _is_z85(text: str) -> bool:
    return len(text) == Z85_KEY_LEN and all(c.isprintable() and not c.isspace() for c in text)


def load_public_key(source: KeyText) -> bytes:
    """A public key from its 40 Z85 characters, or from a certificate file (``.key`` or ``.key_secret``)."""
    text = source.decode("ascii", "replace") if isinstance(source, bytes) else str(source)
    text = text.strip()
    if _is_z85(text) and not os.path.exists(text):
        return text.encode("ascii")
    public, _ = _load(text)
    if not public:
        raise ValueError(f"{text}: no public key in this file")
    return public


def load_keypair(path: Union[str, os.PathLike]) -> Tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate file."""
    public, secret = _load(str(path))
    if not public or not secret:
        raise ValueError(f"{path}: not a secret key file (make one with 'python -m backend keys make')")
    return public, secret


def _load(path: str) -> Tuple[Optional[bytes], Optional[bytes]]:
    import zmq.auth
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such key file")
    try:
        return zmq.auth.load_certificate(path)
    except Exception as exc:
        raise ValueError(f"{path}: not a ZeroMQ certificate file ({exc})") from None


def client_keypair_for(secret_file: Optional[Union[str, os.PathLike]]) -> Tuple[bytes, bytes]:
    """The client's keypair from its ``.key_secret`` file; without one, a fresh keypair (which a server with
    an allow-list refuses: fine for a server that takes any client key)."""
    if secret_file:
        return load_keypair(secret_file)
    import zmq
    return zmq.curve_keypair()
