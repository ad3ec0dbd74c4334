"""The MapQuery Processing provider (toolbox, graphical modeler, ``qgis_process``)."""
from __future__ import annotations

import os

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .adapt_algorithm import AdaptAlgorithm
from .algorithms import ClassifyRasterAlgorithm, LocalizeRasterAlgorithm, RankRasterAlgorithm
from .index_algorithms import IndexBuildAlgorithm, IndexSearchAlgorithm


class MapQueryProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "mapquery"

    def name(self) -> str:
        return "MapQuery RS"

    def icon(self) -> QIcon:
        return QIcon(os.path.join(os.path.dirname(os.path.dirname(__file__)), "icon.svg"))

    def loadAlgorithms(self) -> None:  # noqa: N802
        for alg in (ClassifyRasterAlgorithm(), LocalizeRasterAlgorithm(), RankRasterAlgorithm(), IndexBuildAlgorithm(),
                    IndexSearchAlgorithm()):
            self.addAlgorithm(alg)
        self.addAlgorithm(AdaptAlgorithm())
