"""The forms a ``crs`` parameter may take, recognised without touching any file.

A CRS is an authority code (``EPSG:32618``, ``OGC:CRS84``, ``ESRI:102008``), WKT (1 or 2) or PROJJSON. PROJ
strings are not accepted: ``+init=FILE:key`` makes PROJ open (and block on) any file, ``/proc/self/fd/0``
included. Text naming a file in any form (``init=``, grids, ``PARAMETERFILE``, a PROJ4 ``EXTENSION``, a path
where a code belongs) is refused before it reaches PROJ, and each form goes to the parser of that form only
(never to a "user input" parser that tries a file when all else fails).
"""
from __future__ import annotations

import json
import re
from typing import Optional, Tuple

MAX_CRS_CHARS = 20000
AUTHORITY_CODE = re.compile(r"^(EPSG|ESRI|OGC|IAU_2015|IGNF):[A-Za-z0-9_.]{1,32}$", re.IGNORECASE)
WKT_KEYWORDS = ("PROJCS", "GEOGCS", "GEOCCS", "COMPD_CS", "VERT_CS", "LOCAL_CS", "PROJCRS", "GEOGCRS", "GEODCRS",
                "BASEGEOGCRS", "COMPOUNDCRS", "VERTCRS", "ENGCRS", "BOUNDCRS", "DERIVEDPROJCRS", "PARAMETRICCRS",
                "TIMECRS", "GEODETICCRS", "GEOGRAPHICCRS", "PROJECTEDCRS", "VERTICALCRS", "ENGINEERINGCRS")
# anything that can make PROJ or GDAL read a file, or run a PROJ string
FORBIDDEN = re.compile(r"init\s*=|\+proj|\+init|grids|parameterfile|extension\s*\[|proj4|file:|\bpipeline\b",
                       re.IGNORECASE)


def crs_form(text: str) -> Tuple[str, str]:
    """``("authority", "EPSG:32618")``, ``("wkt", text)`` or ``("projjson", text)``; ``ValueError`` otherwise.

    Pure string work, bounded by the length limit: safe to call on the server's I/O thread.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("must be a non-empty string")
    if len(text) > MAX_CRS_CHARS:
        raise ValueError(f"is longer than {MAX_CRS_CHARS} characters")
    if "\x00" in text:
        raise ValueError("holds a NUL character")
    stripped = text.strip()
    if FORBIDDEN.search(stripped):
        raise ValueError("names a file or holds a PROJ string (init=, +proj, grids, PARAMETERFILE, EXTENSION): "
                         "send an EPSG code, WKT or PROJJSON")
    if AUTHORITY_CODE.match(stripped):
        return "authority", stripped
    if stripped.startswith("{"):
        try:
            parsed = json.loads(stripped)
        except ValueError:
            raise ValueError("starts like PROJJSON but is not valid JSON") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("type"), str):
            raise ValueError("PROJJSON must be an object with a 'type'")
        return "projjson", stripped
    head = stripped.split("[", 1)[0].strip().upper()
    if "[" in stripped and head in WKT_KEYWORDS:
        return "wkt", stripped
    raise ValueError("is not an authority code (EPSG:32618), WKT or PROJJSON")


def crs_problem(text: str) -> Optional[str]:
    """The schema check of a ``crs`` parameter: an error text, or None."""
    try:
        crs_form(text)
    except ValueError as exc:
        return str(exc)
    return None
