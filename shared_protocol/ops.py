"""The operations of protocol version 1: their parameters and arrays.

Image arrays are ``uint8`` or ``uint16``, channels last (``H x W x C``, ``C`` in 1, 3 or 4: grey is
repeated to RGB, a 4th channel is alpha). ``uint16`` is scaled to [0, 1] with ``value_range`` when given,
else with the 2nd-98th percentile of the request's valid pixels (a flat image falls back to ``x / 65535``).

Valid pixels: each image array ``NAME`` (``canvas``, ``tiles``, ``images``, ``query_images``) may come with
``NAME_mask``, ``uint8`` of shape ``NAME.shape[:-1]`` (a canvas: H x W; tiles and images: N x H x W), non-zero
where a pixel is valid and 0 where it is not (nodata, transparent, outside the raster's footprint or the
area of interest). Without a mask, a 4-channel image's alpha is the mask (alpha 0: invalid); 1- and
3-channel images without a mask are valid everywhere. A tile, image or SeLo window whose valid share is
below ``min_valid`` (default ``defaults.MIN_VALID_SHARE``) is skipped: not encoded, and no answer comes from
it. classify: a skipped tile is ``{"index": i, "skipped": true, "label": null, "top": []}`` with a NaN
``probs`` row, others carry ``"skipped": false``, and ``result["skipped"]`` counts them. rank: a skipped
image is never ranked (absent from ``by_query``, its ``by_image`` entry is ``[]``, its ``similarity`` row
NaN) and ``result["skipped"]`` lists them (sorted); a skipped query image is ``bad_params``. embed: a
skipped image's embedding row is NaN and ``result["skipped"]`` lists them. localize: a heatmap pixel that
is invalid, or that no kept window covers, is NaN; normalisation and statistics use valid pixels only, the
median smoothing ignores NaN, GeoTIFFs carry ``nodata = nan`` and polygons never cover NaN; a canvas with no
kept window is ``bad_params`` with ``details.reason = "no_valid_pixels"``. A ``canvas_id`` names the pixels
and the mask together.

``transform`` is an affine in rasterio order ``[a, b, c, d, e, f]`` with
``x = a*col + b*row + c`` and ``y = d*col + e*row + f`` (pixel corners), ``crs`` an authority code
(``EPSG:32618``), WKT or PROJJSON (see :mod:`shared_protocol.crs`: never a PROJ string or anything naming a file).
"""
from __future__ import annotations

from typing import Dict, Optional

from .crs import crs_problem
from .defaults import ADAPT_TEMPLATES, DEFAULT_CROP_SIZE, DEFAULT_SMOOTH, DEFAULT_WINDOW_SIZES, MIN_VALID_SHARE
from .schema import ArraySpec, OpSpec, Param

IMAGE_DTYPES = ("uint8", "uint16")
MASK_DTYPES = ("uint8",)
MAX_TEXT = 500  # characters in one class name or query
MAX_TEXTS = 2000  # class names / queries in one request
DEFAULT_MAX_CANVAS_PIXELS = 16384 * 16384
# localize's median filter of `smooth` px runs on blocks of `smooth // SMOOTH_WORK_KERNEL` px averaged from the
# canvas origin: a client stitching canvases keeps their origins on multiples of that block (and of the
# window strides) to get seamless maps
SMOOTH_WORK_KERNEL = 15  # a backend's default limit on height x width (see info.capabilities)
SELO_MODES = ("fast", "reference")  # localize's selo_mode: the fast default, or the original pipeline

# localize with explicit windows: the client names the windows to encode (array WINDOWS_ARRAY, N x 4 int32
# (x0, y0, x1, y1) canvas pixels, end exclusive) and gets each window's raw score back (array SCORES_ARRAY,
# Q x N float32, NaN for a window below min_valid, which is not encoded) instead of heatmaps; the reply's
# result["windows"] counts the windows encoded, result["skipped"] those left out. For whole scenes: a client
# cuts the scene's SeLo windows (shared_protocol.selo) into blocks and makes the map itself, each window
# encoded once.
WINDOWS_ARRAY = "windows"
SCORES_ARRAY = "scores"
MAX_WINDOWS = 1 << 20  # windows in one request
WINDOWS_REFUSE = ("geotiff", "polygons")  # outputs of a heatmap: refused (when true) with explicit windows


def window_boxes_problem(boxes, height: int, width: int) -> Optional[str]:
    """Why ``boxes`` (the ``windows`` array) are not windows of a ``height`` x ``width`` canvas, or None."""
    shape = tuple(getattr(boxes, "shape", ()))
    if len(shape) != 2 or shape[1] != 4 or not 1 <= shape[0] <= MAX_WINDOWS:
        return f"must be N x 4 (x0, y0, x1, y1) with 1 <= N <= {MAX_WINDOWS}, got shape {list(shape)}"
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    if (x0 < 0).any() or (y0 < 0).any() or (x1 > width).any() or (y1 > height).any():
        return f"has a window outside the {width} x {height} canvas"
    if (x1 <= x0).any() or (y1 <= y0).any():
        return "has an empty window (x1 <= x0 or y1 <= y0)"
    return None


def window_scores_problem(scores, queries: int, windows: int) -> Optional[str]:
    """Why ``scores`` (the reply's ``scores`` array) do not answer ``queries`` queries on ``windows`` windows."""
    shape = tuple(getattr(scores, "shape", ()))
    if shape != (queries, windows) or getattr(getattr(scores, "dtype", None), "name", "") != "float32":
        return f"must be float32 of shape {[queries, windows]}, got {getattr(scores, 'dtype', '?')} {list(shape)}"
    return None


def mask_spec(image: ArraySpec) -> ArraySpec:
    """The optional ``NAME_mask`` array of an image array: uint8, its shape without the channels."""
    return ArraySpec(f"{image.name}_mask", MASK_DTYPES, tuple(n - 1 for n in image.ndim), required=False,
                     mask_of=image.name, doc=f"valid pixels of '{image.name}' (non-zero: valid)")


def with_masks(*images: ArraySpec) -> tuple:
    """Image arrays followed by their masks."""
    return tuple(images) + tuple(mask_spec(a) for a in images)


def _texts(value) -> Optional[str]:
    """Class names, texts and queries: each non-blank and at most MAX_TEXT characters."""
    if all(0 < len(s) <= MAX_TEXT and s.strip() for s in value):
        return None
    return f"entries must be non-blank and at most {MAX_TEXT} characters"


MAX_PIXEL_VALUE = 2.0 ** 32  # value_range ends: the images are 8- or 16-bit
MIN_VALUE_SPAN = 1e-3  # a narrower value_range would turn every pixel into 0 or 1 (or overflow)
MAX_COORDINATE = 1e12  # transform entries: far beyond any planet's coordinates, far below float overflow


def _value_range(value) -> Optional[str]:
    if len(value) != 2 or value[0] >= value[1]:
        return "must be [low, high] with low < high"
    if max(abs(value[0]), abs(value[1])) > MAX_PIXEL_VALUE or value[1] - value[0] < MIN_VALUE_SPAN:
        return f"must lie within +-{MAX_PIXEL_VALUE:.0f} and span at least {MIN_VALUE_SPAN}"
    return None


def _six(value) -> Optional[str]:
    if len(value) != 6:
        return "must hold 6 numbers [a, b, c, d, e, f]"
    if max(abs(v) for v in value) > MAX_COORDINATE:
        return f"has an entry beyond +-{MAX_COORDINATE:g}"
    det = value[0] * value[4] - value[1] * value[3]
    if det == 0 or abs(det) < 1e-18:
        return "is not invertible"
    return None


def _canvas_id(value) -> Optional[str]:
    return None if all(c in "0123456789abcdef" for c in value) and value else "must be a canvas_id a reply gave"


def _odd_or_zero(value) -> Optional[str]:
    return None if value == 0 or value % 2 == 1 else "must be 0 (off) or odd"


ADAPTER = Param("adapter", "str", nullable=True, max_len=200,
                doc="name of a loaded adapter (see info.adapters); null = the base model")
VALUE_RANGE = Param("value_range", "float_list", nullable=True, check=_value_range,
                    doc="[low, high] input values mapped to 0 and 1 (uint16 images)")
MIN_VALID = Param("min_valid", "float", default=MIN_VALID_SHARE, min=0.0, max=1.0,
                  doc="tiles, images and windows with a smaller share of valid pixels are skipped")
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
        VALUE_RANGE, ADAPTER, MIN_VALID,
    ),
    arrays=with_masks(ArraySpec("tiles", IMAGE_DTYPES, (4,), required=False),
                      ArraySpec("canvas", IMAGE_DTYPES, (3,), required=False)),
    long_running=True,
)

RANK = OpSpec(
    "rank",
    "Similarity of images and queries (texts and/or query images), ranked both ways.",
    params=(
        Param("texts", "str_list", nullable=True, max_len=MAX_TEXTS, check=_texts),
        TOP_K, VALUE_RANGE, ADAPTER, MIN_VALID,
    ),
    arrays=with_masks(ArraySpec("images", IMAGE_DTYPES, (4,)),
                      ArraySpec("query_images", IMAGE_DTYPES, (4,), required=False)),
    long_running=True,
)

LOCALIZE = OpSpec(
    "localize",
    "Semantic localization (SeLo): one heatmap per text query over one canvas.",
    params=(
        Param("queries", "str_list", required=True, min_len=1, max_len=64, check=_texts),
        Param("window_sizes", "int_list", default=lambda: list(DEFAULT_WINDOW_SIZES), min_len=1, max_len=8, min=8,
              max=65536, doc="square window sizes in canvas pixels"),
        Param("crop_size", "int", default=DEFAULT_CROP_SIZE, min=8, max=4096,
              doc="each window is resized to this before the model's own preprocessing"),
        Param("smooth", "int", default=DEFAULT_SMOOTH, min=0, max=4001, check=_odd_or_zero,
              doc="median-filter kernel in canvas pixels (0: off)"),
        Param("normalize", "bool", default=True, doc="min-max normalise each heatmap to [0, 1]"),
        Param("selo_mode", "str", default="fast", choices=SELO_MODES,
              doc="'fast': exact window means on cells, block-median smoothing (the default); 'reference': the "
                  "original pipeline step by step (OpenCV bicubic, JPEG round trip, PIL preprocessing, 8-bit "
                  "map, cv2.medianBlur): slow, for measuring and reproducing published numbers"),
        Param("transform", "float_list", nullable=True, check=_six, doc="canvas affine, rasterio order"),
        Param("crs", "str", nullable=True, max_len=20000, check=crs_problem,
              doc="canvas CRS: an authority code (EPSG:32618), WKT or PROJJSON; no PROJ strings, no files"),
        Param("geotiff", "bool", default=False, doc="also return each heatmap as GeoTIFF bytes"),
        Param("polygons", "bool", default=False, doc="also return regions above threshold as GeoJSON"),
        Param("threshold", "float", default=0.5, min=0.0, max=1.0, doc="polygon threshold on the heatmap"),
        Param("canvas_id", "str", nullable=True, max_len=128, check=_canvas_id,
              doc="a canvas_id from an earlier localize reply: that canvas again, without sending it (the "
                  "'canvas' array may then be left out); not_found with reason 'canvas_unknown' when the "
                  "server no longer holds it"),
        VALUE_RANGE, ADAPTER, MIN_VALID,
    ),
    arrays=with_masks(ArraySpec("canvas", IMAGE_DTYPES, (3,), required=False,
                                doc="H x W x C; may be left out when canvas_id names a canvas the server holds "
                                    "(the id covers the canvas and its mask)")) + (
        ArraySpec(WINDOWS_ARRAY, ("int32",), (2,), required=False,
                  doc="N x 4 (x0, y0, x1, y1): encode exactly these windows and reply with their raw scores "
                      f"('{SCORES_ARRAY}', Q x N float32, NaN below min_valid) instead of heatmaps; window_sizes, "
                      "smooth and normalize do not apply, selo_mode must be 'fast'"),),
    long_running=True,
)

EMBED = OpSpec(
    "embed",
    "Raw embeddings of images and/or texts.",
    params=(
        Param("texts", "str_list", nullable=True, max_len=MAX_TEXTS, check=_texts),
        Param("normalize", "bool", default=True),
        VALUE_RANGE, ADAPTER, MIN_VALID,
    ),
    arrays=with_masks(ArraySpec("images", IMAGE_DTYPES, (4,), required=False)),
    long_running=True,
)

# -- the index (backend/index): windows of whole rasters embedded once, searched without the pixels -------
def _extent(value) -> Optional[str]:
    return None if len(value) == 4 and value[0] <= value[2] and value[1] <= value[3] else \
        "must be [xmin, ymin, xmax, ymax]"


INDEX_REF = Param("index", "str", required=True, max_len=4096,
                  doc="an index: the name the server gave it (index_info) or its folder")
INDEX_WINDOW_SIZES = (256, 512, 768)  # the default window sizes of a new index

INDEX_BUILD = OpSpec(
    "index_build",
    "Index rasters (GeoTIFF, COG, VRT) into an index folder: windows embedded once, stored with footprints. "
    "Incremental and resumable: complete unchanged rasters are skipped, changed ones replaced, a cancelled or "
    "killed build resumes where it stopped.",
    params=(
        INDEX_REF,
        Param("rasters", "str_list", required=True, min_len=1, max_len=100000, doc="raster files"),
        Param("window_sizes", "int_list", nullable=True, min_len=1, max_len=8, min=8, max=65536,
              doc="window sizes in raster pixels (a new index: default 256, 512, 768; null: the index's)"),
        Param("crop_size", "int", nullable=True, min=8, max=4096, doc="windows are resized to this first (256)"),
        Param("min_valid", "float", nullable=True, min=0.0, max=1.0,
              doc="windows with a smaller share of valid pixels are left out (0.5)"),
        Param("create", "bool", default=True, doc="create the index when missing (false: add to an existing one)"),
        ADAPTER,
    ),
    long_running=True,
)

INDEX_SEARCH = OpSpec(
    "index_search",
    "Search an index by texts, image chips and/or example polygons (minus negatives): the top-k windows, and "
    "optionally score surfaces (GeoTIFF bytes), from the stored embeddings alone.",
    params=(
        INDEX_REF,
        Param("texts", "str_list", nullable=True, max_len=64, check=_texts),
        Param("negative_texts", "str_list", nullable=True, max_len=64, check=_texts),
        Param("examples", "dict", nullable=True, doc="GeoJSON (geometry, Feature or FeatureCollection) of positives"),
        Param("negatives", "dict", nullable=True, doc="GeoJSON of negative examples"),
        Param("examples_crs", "str", default="EPSG:4326", max_len=20000, doc="CRS of examples and negatives"),
        Param("exclude_examples", "bool", default=True, doc="leave the examples' own windows out of the results"),
        TOP_K,
        Param("extent", "float_list", nullable=True, check=_extent, doc="only windows meeting this box"),
        Param("extent_crs", "str", default="EPSG:4326", max_len=20000),
        Param("surface", "bool", default=False, doc="also return score surfaces (surface_i GeoTIFF bytes)"),
        Param("surface_raster", "str", nullable=True, max_len=4096, doc="only this raster's surface"),
        Param("surface_max_size", "int", default=4096, min=16, max=65536, doc="long side of a surface (px)"),
    ),
    arrays=(ArraySpec("images", IMAGE_DTYPES, (4,), required=False, doc="image chips (N x H x W x C) as positives"),),
    long_running=True,
)

INDEX_INFO = OpSpec(
    "index_info",
    "The indexes open on the server (no 'index'), or one index's model, window settings, rasters and size.",
    params=(Param("index", "str", nullable=True, max_len=4096),),
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
        Param("templates", "str", default=ADAPT_TEMPLATES, max_len=100, doc="zero-shot template set (see "
              "defaults.ADAPT_TEMPLATES)"),
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
    HELLO, INFO, PING, CANCEL, SHUTDOWN, CLASSIFY, RANK, LOCALIZE, EMBED, INDEX_BUILD, INDEX_SEARCH, INDEX_INFO,
    TRAIN)}
