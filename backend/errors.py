"""The backend's own errors. Models, adapters, training and data raise these; the service (and the command
line) map them to protocol error codes, in one place: :func:`backend.service.protocol_error`.
"""
from __future__ import annotations

from typing import Any, Dict


class BackendError(Exception):
    """Base class: a readable ``message`` plus machine-readable ``details``."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details: Dict[str, Any] = details

    def __str__(self) -> str:
        return self.message


class ModelLoadError(BackendError):
    """A model that cannot be built or loaded (unknown name, missing or unfitting weights, no CUDA ...)."""


class AdapterError(BackendError):
    """An adapter that cannot be built, loaded or applied (wrong base model, bad file ...)."""


class UnknownAdapter(BackendError):
    """A request names an adapter the engine does not hold."""


class ImageInputError(BackendError, ValueError):
    """Pixels the models cannot take (dtype, shape, empty images)."""


class DataError(BackendError, ValueError):
    """Training or evaluation data that cannot be read (missing files, unknown layout, bad encoding)."""
