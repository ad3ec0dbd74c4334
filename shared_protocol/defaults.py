"""Grid and SeLo defaults, written once: the backend, its command line and the plugin import these."""

MIN_VALID_SHARE = 0.5          # tiles / windows with a smaller valid share are skipped
DEFAULT_TILE_SIZE = 224        # classify / search grid tile, canvas pixels
DEFAULT_WINDOW_SIZES = (256, 512, 768)   # SeLo windows
DEFAULT_CROP_SIZE = 256
DEFAULT_SMOOTH = 251
