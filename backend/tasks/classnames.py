"""Standard remote-sensing scene class lists (dataset presets for classify)."""
from __future__ import annotations

from typing import Dict, List

CLASS_PRESETS: Dict[str, List[str]] = {
    "aid": [
        "airport", "bare land", "baseball field", "beach", "bridge", "center", "church", "commercial",
        "dense residential", "desert", "farmland", "forest", "industrial", "meadow", "medium residential",
        "mountain", "park", "parking", "playground", "pond", "port", "railway station", "resort", "river",
        "school", "sparse residential", "square", "stadium", "storage tanks", "viaduct",
    ],
    "resisc45": [
        "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
        "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
        "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake",
        "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
        "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship",
        "snowberg", "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
        "thermal_power_station", "wetland",
    ],
    "eurosat": [
        "annual crop land", "forest", "herbaceous vegetation land", "highway or road", "industrial buildings",
        "pasture land", "permanent crop land", "residential buildings", "river", "sea or lake",
    ],
    "ucm": [
        "agricultural", "airplane", "baseball diamond", "beach", "buildings", "chaparral", "dense residential",
        "forest", "freeway", "golf course", "harbor", "intersection", "medium residential", "mobile home park",
        "overpass", "parking lot", "river", "runway", "sparse residential", "storage tanks", "tennis court",
    ],
    "whu-rs19": [
        "airport", "beach", "bridge", "commercial", "desert", "farmland", "football field", "forest",
        "industrial", "meadow", "mountain", "park", "parking", "pond", "port", "railway station", "residential",
        "river", "viaduct",
    ],
}
EXPECTED_SIZES = {"aid": 30, "resisc45": 45, "eurosat": 10, "ucm": 21, "whu-rs19": 19}
