"""The QGIS plugin object: menu action, dock, Processing provider, backend lifetime."""
from __future__ import annotations

import os
from typing import Any, Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .manager import BackendManager
from .settings import Settings

ICON = os.path.join(os.path.dirname(__file__), "icon.svg")


class MapQueryPlugin:
    def __init__(self, iface: Any):
        self.iface = iface
        self.manager = BackendManager(Settings.load())
        self.dock: Optional[Any] = None
        self.action: Optional[QAction] = None
        self.provider: Optional[Any] = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS's name)
        from .processing.provider import MapQueryProvider
        provider = MapQueryProvider()
        # refused (and deleted by QGIS) when a provider 'mapquery' is registered already: then not ours to remove
        self.provider = provider if QgsApplication.processingRegistry().addProvider(provider) else None

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        self.action = QAction(QIcon(ICON), "MapQuery RS", self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.toggled.connect(self.toggle_dock)
        self.iface.addPluginToMenu("MapQuery RS", self.action)
        self.iface.addToolBarIcon(self.action)
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.manager.stop)
        if self.manager.managed and self.manager.settings.backend_python:
            self.manager.start()  # model loading takes a while: begin at once, in the background

    def toggle_dock(self, checked: bool) -> None:
        if checked and self.dock is None:
            from .dock import MapQueryDock
            self.dock = MapQueryDock(self.iface, self.manager, self.iface.mainWindow())
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self._dock_visibility)
        if self.dock is not None:
            self.dock.setVisible(checked)

    def _dock_visibility(self, visible: bool) -> None:
        if self.action is not None:
            self.action.setChecked(visible)

    def show_dock(self) -> Any:
        if self.action is not None:
            self.action.setChecked(True)
        return self.dock

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginMenu("MapQuery RS", self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        self.manager.stop()
