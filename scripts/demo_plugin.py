#!/usr/bin/env python3
"""``make demo``: run the QGIS plugin's own code headless against a backend it starts (see qgis_plugin/demo.py).

Run with QGIS's Python: ``/usr/bin/python3 scripts/demo_plugin.py --backend-python .venv/bin/python --out out/``
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis_plugin.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
