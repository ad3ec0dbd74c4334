"""The ``train`` operation: adapt the served model to labelled chips, register the adapter, save it.

Instant methods (``instant-cache``, ``linear-probe``) fit a head on the base model's embeddings of the chips
(seconds on a CPU); the trained methods (CoOp, LoRA, GDPL, MRS-Adapter) run the usual trainer on the chips in
memory, with a checkpoint per epoch in the store's ``.jobs/`` folder (``resume`` continues from it). Held-out
accuracy is measured on the validation chips through the classify path, zero-shot and adapted. The adapter is
saved (atomically) and registered only once everything succeeded: a cancelled or failed job leaves the served
adapters and the folder's adapter files as they were.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from shared_protocol import ErrorCode, ProtocolError, Reply

from ..adapters import describe_adapter, get_method, load_adapter, save_adapter
from ..adapters.instant.fit import cache_keys, tune_cache, tune_probe
from ..engine import Engine
from ..models.preprocess import preprocess_batch, value_scale
from ..server import Job
from ..tasks import classify as classify_task
from ..tasks.templates import get_templates
from .metrics import accuracy_report
from .split import class_counts, groups_on_both_sides, split_by_group
from .store import AdapterStore, adapter_summary, free_name

log = logging.getLogger("backend.adapt.job")
TRAINED_DEFAULTS = {"epochs": 10, "batch_size": 16}  # few-shot: a handful of examples per class


def bad(message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PARAMS, message, details)


def check_examples(classes: Sequence[str], arrays: Dict[str, np.ndarray], seed: int
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(chips, labels, groups, held_out flags) checked: one label per chip, every class with two examples or
    more, no example (group) on both sides of the split."""
    classify_task.check_classes(classes)
    chips, labels = arrays["chips"], arrays["labels"].astype(np.int64)
    n = len(chips)
    if n == 0:
        raise ProtocolError(ErrorCode.BAD_ARRAY, "train: no chips", {"name": "chips"})
    for name in ("labels", "groups", "held_out"):
        if name in arrays and len(arrays[name]) != n:
            raise ProtocolError(ErrorCode.BAD_ARRAY, f"train: '{name}' has {len(arrays[name])} entries for {n} "
                                "chips", {"name": name})
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ProtocolError(ErrorCode.BAD_ARRAY, f"train: labels must index the {len(classes)} classes (0.."
                            f"{len(classes) - 1})", {"name": "labels"})
    counts = np.bincount(labels, minlength=len(classes))
    few = {c: int(k) for c, k in zip(classes, counts, strict=True) if k < 2}
    if few:
        raise bad(f"every class needs at least 2 examples; too few: {few}", reason="too_few_examples", counts=few)
    groups = arrays["groups"].astype(np.int64) if "groups" in arrays else np.arange(n)
    mixed = [int(g) for g in np.unique(groups) if len(np.unique(labels[groups == g])) > 1]
    if mixed:
        raise bad(f"examples {mixed[:10]} hold chips of different classes", reason="mixed_example")
    if "held_out" in arrays:
        held = arrays["held_out"].astype(bool)
        both = groups_on_both_sides(groups, held)
        if both:
            raise bad(f"examples {both[:10]} have chips in training and in validation: split by example",
                      reason="split_leaks")
    else:
        held = split_by_group(labels, groups, seed=seed)
    no_train = [c for k, c in enumerate(classes) if not ((labels == k) & ~held).any()]
    if no_train:
        raise bad(f"classes {no_train} have no training chips (all held out)", reason="no_training_examples")
    return chips, labels, groups, held


def examples_digest(classes: Sequence[str], arrays: Dict[str, np.ndarray], params: Dict[str, Any]) -> str:
    """SHA-256 of the examples (classes, chips, labels, groups, split, value range): the adapter's provenance."""
    h = hashlib.sha256(json.dumps([list(classes), params.get("value_range")]).encode())
    for name in ("chips", "labels", "groups", "held_out"):
        if name in arrays:
            arr = np.ascontiguousarray(arrays[name])
            h.update(f"{name}{arr.dtype.str}{arr.shape}".encode())
            h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


class ArrayLoader:
    """Chip indices -> preprocessed model input on the CPU (the trainer's loader for chips in memory)."""

    def __init__(self, chips: np.ndarray, loaded, scale):
        self.chips, self.scale = chips, scale
        self.spec = SimpleNamespace(device=torch.device("cpu"), image_size=tuple(loaded.image_size),
                                    mean=tuple(loaded.mean), std=tuple(loaded.std))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return preprocess_batch(self.chips[list(indices)], self.spec, scale=self.scale)


def _progress(job: Job, lo: float, hi: float):
    return lambda p, m: job.progress(lo + (hi - lo) * p, m)


def classify_chips(engine: Engine, chips: np.ndarray, classes: Sequence[str], adapter: Optional[str],
                   params: Dict[str, Any], progress) -> np.ndarray:
    """Predicted class indices through the classify operation's own path (what a client will get)."""
    if not len(chips):
        return np.zeros(0, int)
    req = {"classes": list(classes), "top_k": 1, "templates": params["templates"], "ensemble": "georsclip",
           "value_range": params.get("value_range"), "adapter": adapter}
    _, arrays = classify_task.classify(engine, req, {"tiles": chips}, progress)
    return arrays["probs"].argmax(axis=1)


def fit_instant(engine: Engine, method: str, classes: List[str], chips: np.ndarray, labels: np.ndarray,
                groups: np.ndarray, held: np.ndarray, params: Dict[str, Any], job: Job):
    """(adapted model, tuning facts) of an instant method, from the base model's embeddings of the chips."""
    scale = value_scale(chips, params.get("value_range"))
    feats = engine.encode_images(chips, None, scale=scale, progress=_progress(job, 0.05, 0.8))
    text = classify_task.class_vectors(engine, classes, {"templates": params["templates"]}).float()
    job.progress(0.82, "fitting")
    feats, text = feats.float().cpu(), text.cpu()
    tr, va = torch.from_numpy(~held), torch.from_numpy(held)
    y = torch.from_numpy(labels)
    spec = get_method(method)
    if spec.name == "instant-cache":
        tuned = tune_cache(feats[tr], y[tr], text, feats[va], y[va], torch.from_numpy(groups)[tr])
        cfg = spec.config_cls(classes=list(classes), n_cache=int(tr.sum()), alpha=tuned["alpha"],
                              beta=tuned["beta"])
        keys, mean = cache_keys(feats[tr], tuned["centre"])
        tensors = {"text": text, "keys": keys, "mean": mean, "values": F.one_hot(y[tr], len(classes)).float()}
    else:
        tuned = tune_probe(feats[tr], y[tr], text, feats[va], y[va])
        cfg = spec.config_cls(classes=list(classes), reg=tuned["reg"])
        tensors = {"weight": tuned.pop("weight"), "bias": tuned.pop("bias")}
    model = spec.build(engine.loaded, cfg)
    model.load_adapter_state(tensors)
    return model.eval(), {k: v for k, v in tuned.items() if v is not None}


def train_gradient(engine: Engine, store: Optional[AdapterStore], method: str, classes: List[str],
                   chips: np.ndarray, labels: np.ndarray, held: np.ndarray, params: Dict[str, Any], digest: str,
                   name: str, job: Job):
    """(adapted model, history) of a trained method through :class:`backend.training.trainer.Trainer`."""
    import tempfile
    from ..training.data import ClassData
    from ..training.trainer import TrainConfig, Trainer
    spec = get_method(method)
    epochs = params.get("epochs") or TRAINED_DEFAULTS["epochs"]
    out_dir = store.job_dir(name, spec.name, digest) if store is not None else \
        tempfile.mkdtemp(prefix="mapquery-train-")
    if not params.get("resume") and store is not None:
        store.discard_job(name, spec.name, digest)  # a fresh start
    data = ClassData(list(classes), [(int(i), int(labels[i])) for i in np.flatnonzero(~held)],
                     [(int(i), int(labels[i])) for i in np.flatnonzero(held)])
    cfg = TrainConfig(method=spec.name, out_dir=str(out_dir), epochs=epochs, lr=params.get("lr"),
                      batch_size=params.get("batch_size") or TRAINED_DEFAULTS["batch_size"], seed=params["seed"],
                      resume=bool(params.get("resume")), progress=False, eval_templates=params["templates"])
    state = {"val": None}

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        val = f" | val {state['val']:.1f}%" if state["val"] is not None else ""
        job.progress(0.05 + 0.85 * (epoch + (step + 1) / steps) / epochs,
                     f"epoch {epoch + 1}/{epochs} step {step + 1}/{steps} loss {loss:.4f}{val}")

    def on_epoch(record: Dict[str, Any]) -> None:
        state["val"] = record.get("eval", {}).get("top1")
        val = f" val {state['val']:.1f}%" if state["val"] is not None else ""
        job.progress(0.05 + 0.85 * record["epoch"] / epochs,
                     f"epoch {record['epoch']}/{epochs} loss {record.get('loss', float('nan')):.4f}{val}")

    ckpt = Path(out_dir) / "checkpoint.pt"
    resumed = int(torch.load(str(ckpt), map_location="cpu", weights_only=True)["epoch"]) \
        if params.get("resume") and ckpt.is_file() else None
    trainer = Trainer(engine.loaded, cfg, data, log=log.info,
                      loader=ArrayLoader(chips, engine.loaded, value_scale(chips, params.get("value_range"))),
                      on_step=on_step, on_epoch=on_epoch)
    try:
        result = trainer.run()
    finally:
        if store is None:  # no folder to resume from: no checkpoint to keep
            shutil.rmtree(out_dir, ignore_errors=True)
    return trainer.model, {"history": result["history"], "job_dir": str(out_dir), "resumed_from_epoch": resumed}


def run_train(engine: Engine, store: Optional[AdapterStore], adapter_info: Dict[str, Dict[str, Any]],
              job: Job) -> Reply:
    started = time.perf_counter()
    params, arrays = job.request.params, job.request.arrays
    name, method, classes = params["name"], params["method"], list(params["classes"])
    get_templates(params["templates"])  # a bad template set fails before any work
    chips, labels, groups, held = check_examples(classes, arrays, params["seed"])
    free_name(store, engine.adapters, name, params["overwrite"])
    digest = examples_digest(classes, arrays, params)
    counts = class_counts(labels, classes, held, groups)
    job.progress(0.01, f"{len(chips)} chips ({int(held.sum())} held out) of {len(classes)} classes")
    instant = bool(get_method(method).defaults.get("instant"))
    if not instant and next(engine.loaded.model.parameters()).dtype != torch.float32:
        raise bad(f"{method} trains on the fp32 weights, which this server freed (serve --adapter-dir none on a "
                  "bf16 CPU): use an instant method, or serve with an adapter folder", reason="no_fp32_weights")
    was_training = engine.loaded.model.training
    try:
        if instant:
            model, facts = fit_instant(engine, method, classes, chips, labels, groups, held, params, job)
        else:
            model, facts = train_gradient(engine, store, method, classes, chips, labels, held, params, digest,
                                          name, job)
    finally:
        engine.loaded.model.train(was_training)  # the trainer's train() reaches the shared base model
    job.progress(0.92, "measuring held-out accuracy")
    val_chips, val_labels = chips[held], labels[held]
    zero_pred = classify_chips(engine, val_chips, classes, None, params, lambda p, m: None)
    probe_name = f"\x00job-{job.request.id}"  # served to this job only, removed below
    engine.register_adapter(probe_name, model.eval())
    try:
        adapted_pred = classify_chips(engine, val_chips, classes, probe_name, params, lambda p, m: None)
    finally:
        engine.adapters.pop(probe_name, None)
        engine.cache.drop_where(lambda key: isinstance(key, tuple) and len(key) > 1 and key[1] == probe_name)
    metrics = {"zero_shot": accuracy_report(zero_pred, val_labels, classes),
               "adapted": accuracy_report(adapted_pred, val_labels, classes),
               "held_out_chips": int(held.sum()), "train_chips": int((~held).sum())}
    job.check_cancelled()  # the last point where a cancel is honoured: nothing is saved or registered yet
    free_name(store, engine.adapters, name, params["overwrite"])
    extra = {"classes": classes, "metrics": metrics,
             "adapt": {"method": get_method(method).name, "base_model": engine.loaded.name,
                       "base_arch": engine.loaded.arch, "base_weights": engine.loaded.weights,
                       "base_random_weights": bool(engine.loaded.random_weights), "examples_sha256": digest,
                       "counts": counts,
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "tuning": {k: v for k, v in facts.items() if k != "job_dir"},
                       "seed": params["seed"], "templates": params["templates"],
                       "value_range": params.get("value_range"), "provenance": params.get("provenance") or {}}}
    extra = json.loads(json.dumps(extra, default=float))
    out: Dict[str, np.ndarray] = {}
    if store is not None:
        path = save_adapter(store.path(name), model, extra=extra)
        served = load_adapter(path, engine.loaded)  # what a restart will serve
        engine.register_adapter(name, served)
        adapter_info[name] = describe_adapter(path)
        if not instant:
            store.discard_job(name, get_method(method).name, digest)
        if params.get("return_file"):
            out["adapter_file"] = np.frombuffer(path.read_bytes(), np.uint8)
    else:  # no folder (serve --adapter-dir none): served until the server stops
        model.file_header = {"extra": extra}
        engine.register_adapter(name, model.prepare_inference())
        adapter_info[name] = {"method": get_method(method).name, "path": None, "extra": extra}
        path = None
    job.progress(1.0, "done")
    result = {"name": name, "method": get_method(method).name, "classes": classes, "counts": counts,
              "metrics": metrics, "examples_sha256": digest, "path": str(path) if path else None,
              "seconds": round(time.perf_counter() - started, 3),
              "tuning": extra["adapt"]["tuning"], "adapter_info": adapter_summary(adapter_info[name])}
    return Reply.ok(job.request.id, "train", result, out)
