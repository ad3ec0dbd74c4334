"""Grid and SeLo defaults, written once: the backend, its command line and the plugin import these."""

MIN_VALID_SHARE = 0.5          # tiles / windows with a smaller valid share are skipped
DEFAULT_TILE_SIZE = 224        # classify / search grid tile, canvas pixels
DEFAULT_WINDOW_SIZES = (256, 512, 768)   # SeLo windows
DEFAULT_CROP_SIZE = 256
DEFAULT_SMOOTH = 251
# the template set of an adaptation job's zero-shot classifier (instant methods keep it in the adapter; the
# held-out report compares zero-shot and adapted with it): one prompt per class, as Tip-Adapter and CoOp use
# one hand-written template per dataset outside ImageNet, so that a cold job does not encode GeoRSCLIP's 105
# prompts per class (seconds on a CPU); 'georsclip' on request
ADAPT_TEMPLATES = "simple"
