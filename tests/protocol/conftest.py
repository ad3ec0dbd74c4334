import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # QGIS's Python runs these too, without the venv's editable install
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


import pytest  # noqa: E402

from shared_protocol.endpoints import free_port  # noqa: E402


@pytest.fixture
def addr() -> str:
    """A free loopback TCP address for one test's server."""
    return f"tcp://127.0.0.1:{free_port()}"
