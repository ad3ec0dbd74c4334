"""One tool per task, shared by the dock and the Processing algorithms (like Deepness's map processors).

Each module holds a parameters dataclass and a processor: ``classify`` (zero-shot labels on a tile grid),
``search`` (tiles ranked against a text query), ``localize`` (SeLo heatmaps) and ``index`` (build and
search the backend's index of whole rasters: no pixels read here). A processor reads a source
from :mod:`sources` (one capture, or a whole raster in blocks), sends its pixels with their valid-pixel masks
and never touches widgets or layers.
"""
