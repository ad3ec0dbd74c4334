"""``mapquery:adapt``: the dock's Adapt tool for the toolbox, the modeler and ``qgis_process``: a raster and a
labelled point/polygon layer -> chips (:class:`tools.adapt.AdaptProcessor`) -> the backend's ``train`` -> a new
adapter registered on the server; the held-out report is logged and returned."""
from __future__ import annotations

import json
from typing import Any, Dict

from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingOutputNumber,
                       QgsProcessingOutputString, QgsProcessingParameterBoolean, QgsProcessingParameterEnum,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterField,
                       QgsProcessingParameterNumber, QgsProcessingParameterString)

from shared_protocol.ops import ADAPT_METHODS

from ..capture import RasterSource
from ..connection import make_client
from ..tools.adapt import AdaptParams, AdaptProcessor, examples_of
from ..tools.base import Common, Feedback
from .algorithms import _Base, _tr


class AdaptAlgorithm(_Base):
    LABELS, CLASS_FIELD, METHOD, NAME = "LABELS", "CLASS_FIELD", "METHOD", "NAME"
    CHIP_SIZE, EPOCHS, OVERWRITE, SKIP_OUTSIDE = "CHIP_SIZE", "EPOCHS", "OVERWRITE", "SKIP_OUTSIDE"

    def name(self) -> str:
        return "adapt"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Adapt the model to labelled places")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Cuts chips from the raster's valid pixels around labelled points and over labelled polygons "
                   "(any CRS), sends them to the MapQuery backend, which adapts its model (instant-cache and "
                   "linear-probe take seconds; coop, lora, gdpl, mrs-adapter train) and registers the adapter "
                   "under NAME. Whole features are held out to measure the accuracy, zero-shot and adapted. "
                   "Then classify with ADAPTER = NAME.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._common_params()  # raster, bands, resolution (of a chip pixel), backend ...; AOI and ADAPTER unused
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.LABELS, _tr("Labelled points or polygons"),
            [QgsProcessing.TypeVectorPoint, QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, _tr("Class field"), None, self.LABELS))
        self.addParameter(QgsProcessingParameterEnum(self.METHOD, _tr("Method"), list(ADAPT_METHODS),
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterString(self.NAME, _tr("Adapter name (A-Z a-z 0-9 _ . -)")))
        self.addParameter(QgsProcessingParameterNumber(self.CHIP_SIZE, _tr("Chip size (pixels)"),
                                                       QgsProcessingParameterNumber.Integer, 224, minValue=8,
                                                       maxValue=4096))
        self._advanced(QgsProcessingParameterNumber(self.EPOCHS, _tr("Epochs (trained methods)"),
                                                    QgsProcessingParameterNumber.Integer, 10, minValue=1))
        self.addParameter(QgsProcessingParameterBoolean(self.OVERWRITE, _tr("Replace an adapter of that name"),
                                                        False))
        self.addParameter(QgsProcessingParameterBoolean(self.SKIP_OUTSIDE, _tr("Skip features outside the raster"),
                                                        False))
        self.addOutput(QgsProcessingOutputString("ADAPTER", _tr("Adapter name")))
        self.addOutput(QgsProcessingOutputNumber("ACCURACY", _tr("Held-out accuracy, adapted (%)")))
        self.addOutput(QgsProcessingOutputNumber("ZERO_SHOT_ACCURACY", _tr("Held-out accuracy, zero-shot (%)")))
        self.addOutput(QgsProcessingOutputString("REPORT", _tr("Report (JSON: per class and confusion matrix)")))

    def work(self, parameters, context, feedback) -> Dict[str, Any]:
        raster = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        labels = self.parameterAsSource(parameters, self.LABELS, context)
        if raster is None or labels is None:
            raise QgsProcessingException(_tr("cannot open the raster or the labelled layer"))
        field = self.parameterAsString(parameters, self.CLASS_FIELD, context)
        params = AdaptParams(field, ADAPT_METHODS[self.parameterAsEnum(parameters, self.METHOD, context)],
                             self.parameterAsString(parameters, self.NAME, context),
                             self.parameterAsDouble(parameters, self.RESOLUTION, context) or None,
                             self.parameterAsInt(parameters, self.CHIP_SIZE, context),
                             self.parameterAsInt(parameters, self.EPOCHS, context),
                             min_valid=self.parameterAsDouble(parameters, self.MIN_VALID, context),
                             overwrite=self.parameterAsBool(parameters, self.OVERWRITE, context),
                             skip_outside=self.parameterAsBool(parameters, self.SKIP_OUTSIDE, context),
                             bands=self.parameterAsInts(parameters, self.BANDS, context) or None)
        examples, warnings = examples_of(labels.getFeatures(), labels.fields(), labels.sourceCrs(), field,
                                         raster.crs(), labels.sourceName(), project=context.project())
        proc = AdaptProcessor(RasterSource.of(raster), examples, params, Common(), labels.sourceName())
        _, _, settings, _, fb, _ = self._setup(parameters, context, feedback)
        feedback.pushInfo(f"{len(examples)} labelled features")
        tool_fb = Feedback(lambda p, m: (feedback.setProgress(100.0 * p), feedback.setProgressText(m)), fb.cancel)
        with make_client(settings) as client:
            outcome = proc.run(client, tool_fb)
        metrics = outcome.result.get("metrics") or {}
        self._report(feedback, warnings + outcome.warnings, outcome.summary)
        for row in outcome.table:
            feedback.pushInfo(f"{row['class']}: zero-shot {row['zero_shot']}, adapted {row['adapted']}, "
                              f"confusion {row['confusion']}")
        return {"ADAPTER": outcome.result.get("name"), "ACCURACY": (metrics.get("adapted") or {}).get("top1"),
                "ZERO_SHOT_ACCURACY": (metrics.get("zero_shot") or {}).get("top1"),
                "REPORT": json.dumps({"classes": outcome.result.get("classes"), "rows": outcome.table})}
