"""Fixtures for the plugin tests: one headless QgsApplication, the sample rasters, a live tiny backend
(subprocess in the backend's own Python) and a scriptable fake ROUTER server."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
QGIS_PLUGINS = "/usr/share/qgis/python/plugins"
if QGIS_PLUGINS not in sys.path:
    sys.path.append(QGIS_PLUGINS)

import tempfile  # noqa: E402

from qgis.core import QgsApplication, QgsProject  # noqa: E402
from qgis.PyQt.QtCore import QCoreApplication, QSettings  # noqa: E402

_CONFIG = tempfile.mkdtemp(prefix="mapquery-qgis-tests-")
_APP = QgsApplication([], False, _CONFIG)
_APP.initQgis()
# keep the tests' QgsSettings away from the user's own settings
QCoreApplication.setOrganizationName("MapQueryRSTests")
QSettings.setPath(QSettings.NativeFormat, QSettings.UserScope, _CONFIG)


@pytest.fixture(scope="session")
def qgis_app():
    return _APP


@pytest.fixture(autouse=True)
def outputs_in_test_home(tmp_path_factory, monkeypatch):
    """An unsaved project's outputs (``~/mapquery_outputs``) land in a folder of the test's own, not the user's
    home (beside ``tmp_path``, whose contents some tests check)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"the shared sample rasters are not here ({DATA}); they exist on developer machines and in CI")
    return DATA


@pytest.fixture
def project():
    proj = QgsProject.instance()
    proj.clear()
    yield proj
    proj.clear()


@pytest.fixture(scope="session")
def processing_initialized(qgis_app):
    """QGIS's Processing framework, initialised once (as the Processing plugin does at QGIS's start)."""
    from processing.core.Processing import Processing
    Processing.initialize()
    return QgsApplication.processingRegistry()


@pytest.fixture
def processing_ready(processing_initialized):
    """The registry with a MapQuery provider for one test; the provider this fixture added is removed after it,
    so that no later test (the dock's: loading the plugin registers its own) finds one left behind."""
    from qgis_plugin.processing.provider import MapQueryProvider
    reg = processing_initialized
    provider = None
    if reg.providerById("mapquery") is None:
        provider = MapQueryProvider()
        reg.addProvider(provider)
    yield reg
    if provider is not None:
        reg.removeProvider(provider)


from mq_helpers import ROOT as _ROOT, backend_python, fake_server, start_live_backend  # noqa: E402,F401


@pytest.fixture(scope="session")
def live_backend():
    """(process, settings) of a live backend serving the tiny model, shared by the session."""
    proc, settings = start_live_backend()
    yield settings
    proc.stop()
