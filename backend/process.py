"""Start a backend server in a subprocess and wait until it is ready (used by the demo, tests, benchmarks)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from shared_protocol.endpoints import free_address, free_port, is_ready_line, launch_env, serve_command

__all__ = ["ServerProcess", "ServerStartError", "free_port", "start_server"]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    address: str
    output: List[str] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerStartError(RuntimeError):
    def __init__(self, message: str, output: Sequence[str]):
        super().__init__(message)
        self.output = list(output)


def start_server(extra_args: Sequence[str], address: Optional[str] = None, timeout: float = 180.0,
                 python: str = sys.executable, env: Optional[dict] = None) -> ServerProcess:
    """Run ``python -m backend serve --bind ADDRESS EXTRA_ARGS`` and wait for its 'ready on' line."""
    address = address or free_address()
    cmd = serve_command(python, address, extra_args)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = launch_env({**os.environ, **(env or {})}, source_dir=root)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    server = ServerProcess(proc, address)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.output.append(line.rstrip("\n"))
            if is_ready_line(line):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            server.stop()
            raise ServerStartError(f"backend not ready within {timeout:.0f} s", server.output)
    if proc.poll() is not None or not any(is_ready_line(line) for line in server.output):
        proc.wait()
        raise ServerStartError(f"backend exited with code {proc.returncode}", server.output)
    return server
