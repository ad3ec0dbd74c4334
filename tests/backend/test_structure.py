"""The layering the code promises: commands never import the parser, the engine never imports tasks, and the
models, adapters and training raise the backend's own errors (mapped to protocol codes at the service)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from backend import errors
from backend.service import ModelService, protocol_error
from shared_protocol import ErrorCode, ProtocolError

BACKEND = Path(__file__).resolve().parents[2] / "backend"


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_layering():
    for path in (BACKEND / "commands").glob("*.py"):
        assert not {n for n in _imports(path) if n in ("backend.cli", "..cli")}, path
    assert not {n for n in _imports(BACKEND / "engine.py") if "tasks" in n}
    for package in ("models", "adapters", "training"):
        for path in (BACKEND / package).rglob("*.py"):
            assert not {n for n in _imports(path) if n.startswith("shared_protocol")}, path


@pytest.mark.parametrize("exc,code", [
    (errors.ModelLoadError("no weights", reason="missing_weights"), ErrorCode.MODEL_ERROR),
    (errors.AdapterError("bad adapter"), ErrorCode.MODEL_ERROR),
    (errors.UnknownAdapter("no adapter named 'x'"), ErrorCode.NOT_FOUND),
    (errors.ImageInputError("float32 images"), ErrorCode.BAD_ARRAY),
    (errors.DataError("bad csv"), ErrorCode.BAD_PARAMS),
    (RuntimeError("boom"), ErrorCode.INTERNAL),
])
def test_backend_errors_map_to_protocol_codes(exc, code):
    p = protocol_error(exc)
    assert isinstance(p, ProtocolError) and p.code == code and str(exc) in p.message
    if isinstance(exc, errors.BackendError):
        assert p.details == exc.details


def test_the_service_answers_backend_errors_with_protocol_errors(engine):
    from backend.server import Job
    from shared_protocol import Request
    service = ModelService(engine)
    job = Job(Request("classify", "r", {"classes": ["a", "b"], "top_k": 1, "adapter": "nope"},
                      {"tiles": np.zeros((1, 8, 8, 3), np.uint8)}), b"peer", lambda peer, reply: None)
    with pytest.raises(ProtocolError) as e:
        service.handle(job)
    assert e.value.code == ErrorCode.NOT_FOUND and "nope" in e.value.message
