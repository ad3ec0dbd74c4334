"""The operations of protocol version 1: their parameters and arrays.

Image arrays are ``uint8`` or ``uint16``, channels last (``H x W x C``, ``C`` in 1, 3 or 4: grey is
repeated to RGB, a 4th channel is ignored as alpha). ``uint16`` is scaled to [0, 1] with
``value_range`` when given, else with the 2nd-98th percentile of the request (a flat image falls back to
``x / 65535``). ``transform`` is an affine in rasterio order ``[a, b, c, d, e, f]`` with
``x = a*col + b*row + c`` and ``y = d*col + e*row + f`` (pixel corners), ``crs`` is any string rasterio
understands (``EPSG:32618``, WKT).
"""
from __future__ import annotations

from typing import Dict, Optional

from .schema import ArraySpec, OpSpec, Param

IMAGE_DTYPES = ("uint8", "uint16")
MAX_TEXT = 500  # characters in one class name or query
MAX_TEXTS = 2000  # class names / queries in one request
DEFAULT_MAX_CANVAS_PIXELS = 16384 * 16384
# localize's median filter of `smooth` px runs on blocks of `smooth // SMOOTH_WORK_KERNEL` px averaged from the
# canvas origin: a client stitching canvases keeps their origins on multiples of that block (and of the
# window strides) to get seamless maps
SMOOTH_WORK_KERNEL = 15  # a backend's default limit on height x width (see info.capabilities)


def _texts(value) -> Optional[str]:
    """Class names, texts and queries: each non-blank and at most MAX_TEXT characters."""
    if all(0 < len(s) <= MAX_TEXT and s.strip() for s in value):
        return None
    return f"entries must be non-blank and at most {MAX_TEXT} characters"


def _pair(value) -> Optional[str]:
    if len(value) != 2 or value[0] >= value[1]:
        return "must be [low, high] with low < high"
    return None


def _six(value) -> Optional[str]:
    if len(value) != 6:
        return "must hold 6 numbers [a, b, c, d, e, f]"
    if value[0] * value[4] - value[1] * value[3] == 0:
        return "is not invertible"
    return None


def _canvas_id(value) -> Optional[str]:
    return None if all(c in "0123456789abcdef" for c in value) and value else "must be a canvas_id a reply gave"


def _odd_or_zero(value) -> Optional[str]:
    return None if value == 0 or value % 2 == 1 else "must be 0 (off) or odd"


ADAPTER = Param("adapter", "str", nullable=True, max_len=200,
                doc="name of a loaded adapter (see info.adapters); null = the base model")
VALUE_RANGE = Param("value_range", "float_list", nullable=True, check=_pair,
                    doc="[low, high] input values mapped to 0 and 1 (uint16 images)")
TOP_K = Param("top_k", "int", default=5, min=1, max=10000, doc="how many best matches to return")

HELLO = OpSpec(
    "hello", "Handshake: checks the protocol version and returns the server's info.",
    params=(Param("protocol", "int", required=True, min=0, doc="the client's protocol version"),
            Param("client", "str", default="unknown", max_len=200, doc="client name and version")),
)
INFO = OpSpec("info", "Protocol and backend versions, model, adapters, device, capabilities, limits.")
PING = OpSpec("ping", "Liveness check, answered even while a long request runs.")
CANCEL = OpSpec(
    "cancel", "Cancel a queued or running request of the same client.",
    params=(Param("target", "str", required=True, max_len=64, doc="id of the request to cancel"),),
)
SHUTDOWN = OpSpec("shutdown", "Stop the server after replying.", idempotent=False)

CLASSIFY = OpSpec(
    "classify",
    "Zero-shot labels per tile. Send 'tiles' (N x H x W x C), or one 'canvas' (H x W x C) with tile_size"
    " (and stride) to classify a grid over it.",
    params=(
        Param("classes", "str_list", required=True, min_len=1, max_len=MAX_TEXTS, check=_texts,
              doc="class names (normalised: lower case, '_' and '/' become spaces)"),
        TOP_K,
        Param("templates", "str", default="georsclip", max_len=100,
              doc="template set: georsclip (105), remoteclip, skyclip, simple, none"),
        Param("custom_templates", "str_list", nullable=True, min_len=1, max_len=500,
              check=lambda v: None if all("{}" in t for t in v) else "entries must contain '{}'",
              doc="templates with '{}' for the class name; overrides 'templates'"),
        Param("ensemble", "str", default="georsclip", choices=("georsclip", "openclip"),
              doc="georsclip: mean of raw embeddings then normalise; openclip: normalise each first"),
        Param("tile_size", "int", nullable=True, min=8, max=65536, doc="grid tile size in canvas pixels"),
        Param("stride", "int", nullable=True, min=1, max=65536, doc="grid stride (default: tile_size)"),
        VALUE_RANGE, ADAPTER,
    ),
    arrays=(ArraySpec("tiles", IMAGE_DTYPES, (4,), required=False),
            ArraySpec("canvas", IMAGE_DTYPES, (3,), required=False)),
    long_running=True,
)

RANK = OpSpec(
    "rank",
    "Similarity of images and queries (texts and/or query images), ranked both ways.",
    params=(
        Param("texts", "str_list", nullable=True, max_len=MAX_TEXTS, check=_texts),
        TOP_K, VALUE_RANGE, ADAPTER,
    ),
    arrays=(ArraySpec("images", IMAGE_DTYPES, (4,)),
            ArraySpec("query_images", IMAGE_DTYPES, (4,), required=False)),
    long_running=True,
)

LOCALIZE = OpSpec(
    "localize",
    "Semantic localization (SeLo): one heatmap per text query over one canvas.",
    params=(
        Param("queries", "str_list", required=True, min_len=1, max_len=64, check=_texts),
        Param("window_sizes", "int_list", default=lambda: [256, 512, 768], min_len=1, max_len=8, min=8,
              max=65536, doc="square window sizes in canvas pixels"),
        Param("crop_size", "int", default=256, min=8, max=4096,
              doc="each window is resized to this before the model's own preprocessing"),
        Param("smooth", "int", default=251, min=0, max=4001, check=_odd_or_zero,
              doc="median-filter kernel in canvas pixels (0: off)"),
        Param("normalize", "bool", default=True, doc="min-max normalise each heatmap to [0, 1]"),
        Param("transform", "float_list", nullable=True, check=_six, doc="canvas affine, rasterio order"),
        Param("crs", "str", nullable=True, max_len=20000, doc="canvas CRS (EPSG code or WKT)"),
        Param("geotiff", "bool", default=False, doc="also return each heatmap as GeoTIFF bytes"),
        Param("polygons", "bool", default=False, doc="also return regions above threshold as GeoJSON"),
        Param("threshold", "float", default=0.5, min=0.0, max=1.0, doc="polygon threshold on the heatmap"),
        Param("canvas_id", "str", nullable=True, max_len=128, check=_canvas_id,
              doc="a canvas_id from an earlier localize reply: that canvas again, without sending it (the "
                  "'canvas' array may then be left out); not_found with reason 'canvas_unknown' when the "
                  "server no longer holds it"),
        VALUE_RANGE, ADAPTER,
    ),
    arrays=(ArraySpec("canvas", IMAGE_DTYPES, (3,), required=False,
                      doc="H x W x C; may be left out when canvas_id names a canvas the server holds"),),
    long_running=True,
)

EMBED = OpSpec(
    "embed",
    "Raw embeddings of images and/or texts.",
    params=(
        Param("texts", "str_list", nullable=True, max_len=MAX_TEXTS, check=_texts),
        Param("normalize", "bool", default=True),
        VALUE_RANGE, ADAPTER,
    ),
    arrays=(ArraySpec("images", IMAGE_DTYPES, (4,), required=False),),
    long_running=True,
)

# -- adapting a model from labelled examples (issue 13) -------------------------------------------------
ADAPT_METHODS = ("instant-cache", "linear-probe", "coop", "lora", "gdpl", "mrs-adapter")
INSTANT_METHODS = ("instant-cache", "linear-probe")  # no gradient: seconds on a CPU
ADAPTER_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"


def _adapter_name(value) -> Optional[str]:
    if 0 < len(value) <= 64 and value[0].isalnum() and all(c in ADAPTER_NAME_CHARS for c in value):
        return None
    return "must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"


def _ascii_classes(value) -> Optional[str]:
    bad = [s for s in value if not s.isascii()]
    return f"class names must be ASCII (the text model's vocabulary), not {bad[:3]}" if bad else _texts(value)


TRAIN = OpSpec(
    "train",
    "Adapt the served model to labelled chips and register the adapter under 'name' (no restart; saved in the "
    "server's adapter folder with its provenance). Progress messages name the epoch, loss and validation "
    "accuracy; cancel leaves nothing registered (a trained method's last epoch checkpoint stays for 'resume').",
    params=(
        Param("name", "str", required=True, max_len=64, check=_adapter_name, doc="the new adapter's name"),
        Param("method", "str", required=True, choices=ADAPT_METHODS),
        Param("classes", "str_list", required=True, min_len=2, max_len=MAX_TEXTS, check=_ascii_classes,
              doc="class names; labels index into this list"),
        Param("overwrite", "bool", default=False, doc="replace an adapter of the same name"),
        Param("epochs", "int", nullable=True, min=1, max=10000, doc="trained methods: epochs (default 10)"),
        Param("lr", "float", nullable=True, min=0.0, max=10.0, doc="trained methods: learning rate"),
        Param("batch_size", "int", nullable=True, min=1, max=4096, doc="trained methods: batch size (16)"),
        Param("seed", "int", default=0, min=0),
        Param("resume", "bool", default=False, doc="trained methods: continue a cancelled or killed job with "
              "the same name, method and examples from its last epoch checkpoint"),
        Param("templates", "str", default="georsclip", max_len=100, doc="zero-shot template set"),
        Param("return_file", "bool", default=False, doc="also return the adapter file (array 'adapter_file')"),
        Param("provenance", "dict", nullable=True, doc="the client's facts about the examples (raster, labels, "
              "class field, resolution), stored in the adapter file"),
        VALUE_RANGE,
    ),
    arrays=(ArraySpec("chips", IMAGE_DTYPES, (4,), doc="N x H x W x C example images"),
            ArraySpec("labels", ("int32",), (1,), doc="N class indices into 'classes'"),
            ArraySpec("groups", ("int32",), (1,), required=False,
                      doc="N example ids (the polygon or point a chip comes from); the split never cuts one"),
            ArraySpec("held_out", ("uint8",), (1,), required=False,
                      doc="N flags, non-zero = validation; default: whole groups drawn per class with 'seed'")),
    idempotent=False,
    long_running=True,
)

OPS: Dict[str, OpSpec] = {spec.name: spec for spec in (
    HELLO, INFO, PING, CANCEL, SHUTDOWN, CLASSIFY, RANK, LOCALIZE, EMBED, TRAIN)}
