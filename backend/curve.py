"""The server side of CURVE (Ironhouse): its key folder, the allow-list of client keys, the authenticator.

Folder layout (see :mod:`shared_protocol.curve`): ``server.key`` / ``server.key_secret`` (the server's
keypair) and ``clients/*.key`` (the public keys of the clients allowed in). ``zmq.auth``'s
``ThreadAuthenticator`` answers ZeroMQ's ZAP requests from the allow-list; the folder is read again when it
changes, so ``keys allow`` takes effect on a running server within a second or two.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from shared_protocol.curve import CLIENTS_FOLDER, SERVER_KEY_NAME, load_keypair, load_public_key

__all__ = ["CurveAuth", "ServerKeys", "allow_client", "init_server_folder", "list_keys", "load_public_key",
           "load_server_keys", "make_keypair"]

log = logging.getLogger("backend.curve")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ServerKeys:
    folder: Path
    public: bytes
    secret: bytes

    @property
    def clients(self) -> Path:
        return self.folder / CLIENTS_FOLDER


def make_keypair(folder: os.PathLike, name: str) -> Tuple[Path, Path]:
    """``folder/NAME.key`` and ``folder/NAME.key_secret`` (0600); refuses to overwrite an existing pair."""
    if not NAME_RE.match(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' and '-'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise FileExistsError(f"{public} or {secret} exists already: not replacing a key")
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        made_public, made_secret = zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    os.chmod(made_secret, 0o600)
    os.chmod(made_public, 0o644)
    return Path(made_public), Path(made_secret)


def init_server_folder(folder: os.PathLike) -> Tuple[Path, Path]:
    """The server's keypair and an empty allow-list folder."""
    folder = Path(folder)
    (folder / CLIENTS_FOLDER).mkdir(parents=True, exist_ok=True)
    return make_keypair(folder, SERVER_KEY_NAME)


def allow_client(folder: os.PathLike, source: str, name: Optional[str] = None) -> Path:
    """Add a client's public key (a ``.key`` file or 40 Z85 characters) to the allow-list as ``NAME.key``."""
    public = load_public_key(source)
    name = name or (Path(source).name.split(".key")[0] if os.path.exists(source) else None)
    if not name or not NAME_RE.match(name):
        raise ValueError("give the client a --name (letters, digits, '.', '_', '-')")
    target = Path(folder) / CLIENTS_FOLDER / f"{name}.key"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise FileExistsError(f"{target} exists already: remove it first to replace that client's key")
    tmp = target.with_name(f".{target.name}.part")
    tmp.write_text("#   ZeroMQ CURVE Public Certificate: an allowed client of a MapQuery RS backend\n"
                   f"metadata\ncurve\n    public-key = \"{public.decode('ascii')}\"\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def list_keys(folder: os.PathLike) -> Dict[str, Any]:
    """The server's public key and the allowed clients' public keys."""
    folder = Path(folder)
    server = folder / f"{SERVER_KEY_NAME}.key"
    clients: List[Dict[str, str]] = []
    for path in sorted((folder / CLIENTS_FOLDER).glob("*.key")):
        try:
            clients.append({"name": path.stem, "public_key": load_public_key(str(path)).decode()})
        except ValueError as exc:
            clients.append({"name": path.stem, "error": str(exc)})
    own = sorted(p.stem for p in folder.glob("*.key_secret") if p.stem != SERVER_KEY_NAME)
    return {"folder": str(folder),
            "server_public_key": load_public_key(str(server)).decode() if server.is_file() else None,
            "allowed_clients": clients, "keypairs": own}


def load_server_keys(folder: os.PathLike) -> ServerKeys:
    folder = Path(folder)
    secret = folder / f"{SERVER_KEY_NAME}.key_secret"
    if not secret.is_file():
        raise ValueError(f"{secret} is missing: make it with 'python -m backend keys make {folder}'")
    if secret.stat().st_mode & 0o077:
        log.warning("%s is readable by other users: chmod 600 it", secret)
    public, secret_key = load_keypair(secret)
    if not (folder / CLIENTS_FOLDER).is_dir():
        raise ValueError(f"{folder / CLIENTS_FOLDER} is missing: it holds the allowed clients' public keys")
    return ServerKeys(folder, public, secret_key)


class CurveAuth:
    """ZAP answers from the allow-list folder, reloaded when the folder changes."""

    def __init__(self, context: zmq.Context, keys: ServerKeys):
        self.keys = keys
        self.auth = ThreadAuthenticator(context, log=logging.getLogger("backend.curve.zap"))
        self.auth.start()
        self._stamp: Optional[Tuple[int, ...]] = None
        self.reload()

    def _folder_stamp(self) -> Tuple[int, ...]:
        entries = sorted(self.keys.clients.glob("*.key"))
        return (len(entries), *(p.stat().st_mtime_ns for p in entries))

    def reload(self) -> None:
        try:
            stamp = self._folder_stamp()
        except OSError:
            return
        if stamp != self._stamp:
            self._stamp = stamp
            self.auth.configure_curve(domain="*", location=str(self.keys.clients))
            log.info("CURVE allow-list: %d client key(s)", stamp[0])

    def apply(self, router: zmq.Socket) -> None:
        router.curve_secretkey = self.keys.secret
        router.curve_publickey = self.keys.public
        router.curve_server = True

    def allowed(self) -> int:
        return len(list(self.keys.clients.glob("*.key")))

    def stop(self) -> None:
        self.auth.stop()
