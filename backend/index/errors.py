"""The index's typed errors: :class:`ProtocolError` with a stable ``details.reason``."""
from __future__ import annotations

from typing import Any

from shared_protocol import ErrorCode, ProtocolError

# reasons (details["reason"]) a client may branch on
INDEX_MISSING = "index_missing"  # no index at that folder
INDEX_HALF_WRITTEN = "index_half_written"  # data without a readable index.json
INDEX_VERSION = "index_version"  # written by another format version
INDEX_OTHER_MODEL = "index_other_model"  # made by another model, adapter or weights
INDEX_SETTINGS = "index_settings"  # build settings differ from the index's
INDEX_BUSY = "index_busy"  # another process is writing it
RASTER_UNREADABLE = "raster_unreadable"
RASTER_NO_CRS = "raster_no_crs"
RASTER_BANDS = "raster_bands"
RASTER_DTYPE = "raster_dtype"
NO_QUERY = "no_query"
EXAMPLES_OUTSIDE = "examples_outside"
OUTSIDE_DATA_DIRS = "outside_data_dirs"


def index_error(code: str, reason: str, message: str, **details: Any) -> ProtocolError:
    """A typed error for the index, e.g. ``index_error(ErrorCode.NOT_FOUND, INDEX_MISSING, "...")``."""
    return ProtocolError(code, message, {"reason": reason, **details})


def bad(reason: str, message: str, **details: Any) -> ProtocolError:
    return index_error(ErrorCode.BAD_PARAMS, reason, message, **details)
