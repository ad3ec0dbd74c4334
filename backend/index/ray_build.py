"""``index build --engine ray``: the same build on Ray Data, for collections that outgrow one process.

The driver plans the build exactly as the in-process one (``build.build_index`` with this module's
encoder): which rasters are new, changed or partly done, and which windows are left. Ray Data then reads
the windows (``map_batches`` over units of a few batches of windows, rasterio in each task, block-aligned
strips as in-process), an embedding actor per GPU (one on a CPU-only machine) encodes them with the same
``Engine.encode_windows`` path, and the driver commits the rows to the same LanceDB tables through the same
writer: resumability, duplicates and the completion records work as in-process. The actor loads the model
itself and checks that its weights are the driver's (random weights cannot be shared: use a checkpoint).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .build import _Writer, build_index, rows_table
from .layout import WindowSettings
from .rasters import read_windows

UNIT_BATCHES = 4  # model batches of windows per Ray read task


def make_engine(model_args: Dict[str, Any]):
    """An engine from the ``serve``-like model arguments (model, checkpoint, device, precision, adapter ...)."""
    from ..commands.serve import load_adapters
    from ..engine import Engine, EngineConfig
    from ..models.loading import load_model
    loaded = load_model(model_args["model"], model_config=model_args.get("model_config"),
                        checkpoint=model_args.get("checkpoint"), pretrained=model_args.get("pretrained"),
                        device=model_args.get("device") or "auto",
                        random_weights=bool(model_args.get("random_weights")), offline=model_args.get("offline"))
    adapter = model_args.get("adapter")
    adapters, _ = load_adapters([adapter] if adapter and "=" in adapter else [], loaded)
    return Engine(loaded, EngineConfig(batch_size=int(model_args.get("batch_size") or 0),
                                       precision=model_args.get("precision") or "auto", cache_bytes=0), adapters)


def adapter_name(model_args: Dict[str, Any]) -> Optional[str]:
    adapter = model_args.get("adapter")
    return adapter.partition("=")[0] if adapter else None


def read_unit(batch: Dict[str, np.ndarray], info: Any, boxes: np.ndarray, min_valid: float) -> Dict[str, Any]:
    """Ray ``map_batches`` function: the valid windows of each unit (a list of window indexes) as pixels."""
    index: List[int] = []
    valid: List[float] = []
    pixels: List[np.ndarray] = []
    for unit in batch["todo"]:
        skipped: List[int] = []
        for wb in read_windows(info, boxes, set(int(i) for i in unit), len(unit), min_valid, skipped):
            for (x0, y0, x1, y1), i, v in zip(wb.boxes.tolist(), wb.index.tolist(), wb.valid.tolist(), strict=True):
                index.append(i)
                valid.append(v)
                pixels.append(np.ascontiguousarray(wb.canvas[y0:y1, x0:x1]))
    out = np.empty(len(pixels), dtype=object)
    out[:] = pixels
    return {"index": np.array(index, np.int64), "valid": np.array(valid, np.float32), "pixels": out}


class EmbedActor:
    """Ray actor: encodes windows with the engine, window by window exactly as in-process."""

    def __init__(self, model_args: Dict[str, Any], fingerprint: str, crop_size: int, scale: Sequence[float]):
        from .identity import model_identity
        self.engine = make_engine(model_args)
        self.adapter = adapter_name(model_args)
        mine = model_identity(self.engine, self.adapter)["fingerprint"]
        if mine != fingerprint:
            raise RuntimeError("the Ray actor's model weights differ from the driver's (random weights?): "
                               "build on Ray with a checkpoint or a preset's weights")
        self.crop_size = crop_size
        self.scale = tuple(scale)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, np.ndarray]:
        pixels = list(batch["pixels"])
        dim = self.engine.loaded.embed_dim
        feats = np.zeros((len(pixels), dim), np.float32)
        by_shape: Dict[tuple, List[int]] = {}
        for i, p in enumerate(pixels):
            by_shape.setdefault(p.shape, []).append(i)
        for (h, w, _), idx in by_shape.items():  # windows of one shape side by side: one canvas, one call
            canvas = np.concatenate([pixels[i] for i in idx], axis=1)
            boxes = np.array([[k * w, 0, (k + 1) * w, h] for k in range(len(idx))], np.int64)
            feats[idx] = self.engine.encode_windows(canvas, boxes, self.crop_size, self.adapter, self.scale) \
                .float().cpu().numpy()
        return {"index": np.asarray(batch["index"]), "valid": np.asarray(batch["valid"]), "vector": feats}


def ray_build_index(model_args: Dict[str, Any], path: str, rasters: Sequence[str],
                    settings: Optional[WindowSettings] = None, create: bool = True,
                    progress: Callable[[float, str], None] = lambda f, m: None, address: Optional[str] = None,
                    engine: Any = None) -> Dict[str, Any]:
    """Build (or resume, or add to) an index on Ray; the same report as ``build.build_index``."""
    import ray
    import logging
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the build's own progress is reported instead
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    engine = engine or make_engine(model_args)
    gpus = 1 if engine.device.type == "cuda" else 0

    def encode(engine, store, plan, adapter, commit_rows, progress) -> Dict[str, int]:
        from .identity import model_identity
        settings = store.manifest.windows
        per_unit = max(1, engine.batch_size * UNIT_BATCHES)
        units = [{"todo": plan.todo[i:i + per_unit]} for i in range(0, len(plan.todo), per_unit)]
        if not units:
            return {"added": 0, "skipped": 0}
        ds = ray.data.from_items(units).map_batches(
            read_unit, batch_size=1, batch_format="numpy",
            fn_kwargs={"info": plan.info, "boxes": plan.boxes, "min_valid": settings.min_valid})
        ds = ds.map_batches(EmbedActor, batch_size=engine.batch_size, batch_format="numpy", concurrency=1,
                            num_gpus=gpus, fn_constructor_kwargs={
                                "model_args": model_args, "crop_size": settings.crop_size, "scale": plan.info.scale,
                                "fingerprint": model_identity(engine, adapter)["fingerprint"]})
        writer = _Writer(store, commit_rows)
        added = 0
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if not len(out["index"]):
                    continue
                writer.put(rows_table(plan, out["index"], out["valid"], np.stack(out["vector"]), store.manifest.dim))
                added += len(out["index"])
                progress(len(out["index"]))
        finally:
            writer.close()
        progress(len(plan.todo) - added)
        return {"added": added, "skipped": len(plan.todo) - added}

    report = build_index(engine, path, rasters, settings, adapter=adapter_name(model_args), create=create,
                         progress=progress, encoder=encode)
    report["engine"] = "ray"
    return report
