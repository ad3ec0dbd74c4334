"""The training loop for every method: seeded, resumable, evaluated every epoch, AMP on CUDA.

Task: caption data (Karpathy JSON / CSV) trains with InfoNCE or HMMC and is evaluated by retrieval mR on
the held-out split (an epoch runs over every caption once, as GaLR and PE-RSITR do;
``caption_sampling="one"`` draws one caption per image instead); an ImageFolder trains with cross-entropy
over class prompts (the learned prompts of CoOp/GDPL, or ``train_template`` through the adapted text
encoder for LoRA/MRS-Adapter) and is evaluated by zero-shot top-1 on held-out images. Epoch ``e`` seeds
everything random (shuffling, augmentation, dropout, GDPL's noise) with ``seed`` and ``e``, so a resumed
run equals an uninterrupted one.

Schedules: ``steps`` (linear warm-up over ``warmup_steps``, then cosine per step) or ``dassl`` (Dassl's, which
CoOp and GDPL/MaPLe train with: ``warmup_epochs`` at the constant ``warmup_lr`` 1e-5, then cosine per epoch
over ``epochs``). Augmentation: ``rs`` (flips and quarter turns) or ``dassl`` (random resized crop + flip).

Output folder: ``adapter.pt`` (the adapter file), ``checkpoint.pt`` (adapter + optimizer + history, for
``--resume``), ``metrics.jsonl`` (one JSON object per evaluation).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from backend.adapters.base import AdaptedModel, get_method, save_adapter
from backend.adapters.towers import AdapterError
from backend.evaluation.retrieval import evaluate_retrieval
from backend.evaluation.zeroshot import evaluate_zeroshot
from backend.files import atomic_file
from backend.tasks.templates import normalize_classname

from .data import CaptionData, ClassData, ImageLoader, augment, batches, random_resized_crop_flip
from .losses import hmmc_loss, info_nce, prompt_ce, temperature


SCHEDULES = ("steps", "dassl")
AUGMENTATIONS = ("rs", "dassl")


@dataclass
class TrainConfig:
    method: str
    out_dir: str
    epochs: Optional[int] = None  # None: the method's default (see METHODS[...].defaults)
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None  # sgd | adamw
    weight_decay: Optional[float] = None
    loss: Optional[str] = None  # infonce | hmmc | ce
    hmmc_weights: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    hmmc_dropout: float = 0.2
    warmup_steps: int = 0
    schedule: Optional[str] = None  # steps | dassl (None: the method's default, else steps)
    warmup_epochs: int = 1  # dassl: epochs at warmup_lr before the cosine
    warmup_lr: float = 1e-5
    augmentation: Optional[str] = None  # rs | dassl (None: the method's default, else rs)
    caption_sampling: str = "all"  # retrieval: every caption once per epoch (all) or one per image (one)
    seed: int = 0
    amp: bool = True  # autocast on CUDA only
    augment: bool = True
    train_template: str = "a satellite image of a {}."
    eval_templates: str = "georsclip"
    eval_every: int = 1
    eval_batch_size: int = 64
    max_steps_per_epoch: Optional[int] = None
    resume: bool = False
    stop_after_epoch: Optional[int] = None  # stop (checkpoint written) after this epoch; --resume continues
    progress: bool = True
    method_config: Dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        spec = get_method(self.method)
        d = asdict(self)
        d["method"] = spec.name
        for k, v in spec.defaults.items():
            if k in d and d[k] is None:
                d[k] = v
        d["schedule"] = d["schedule"] or "steps"
        d["augmentation"] = d["augmentation"] or "rs"
        cfg = TrainConfig(**d)
        for name, value, allowed in (("schedule", cfg.schedule, SCHEDULES), ("augmentation", cfg.augmentation,
                                     AUGMENTATIONS), ("caption_sampling", cfg.caption_sampling, ("all", "one"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if cfg.loss not in ("infonce", "hmmc", "ce"):
            raise ValueError(f"loss must be infonce, hmmc or ce, got {cfg.loss!r}")
        if cfg.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")
        return cfg


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


class Trainer:
    """Trains one adapter on ``loaded`` (a ``LoadedModel``, left unchanged) with caption or class data."""

    def __init__(self, loaded, config: TrainConfig, data: CaptionData | ClassData,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                 loader: Any = None, on_step: Optional[Callable[[int, int, int, float], None]] = None,
                 on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None):
        """``loader.batch(keys)`` gives model input for the data's image keys (default: paths read from disk);
        ``on_step(epoch, step, steps, loss)`` after each step and ``on_epoch(record)`` after each epoch (they
        may raise to stop: the last epoch's checkpoint stays, no adapter is written)."""
        self.loaded, self.cfg, self.data, self.log = loaded, config.resolved(), data, log
        self.spec = get_method(self.cfg.method)
        self.task = "classification" if isinstance(data, ClassData) else "retrieval"
        if self.spec.prompt_learner and self.task != "classification":
            raise AdapterError(f"{self.spec.name} learns class prompts: train it on an ImageFolder of classes")
        if self.task == "classification" and self.cfg.loss != "ce":
            self.cfg.loss = "ce"
        if self.task == "retrieval" and self.cfg.loss == "ce":
            self.cfg.loss = "infonce"
        self.out = Path(self.cfg.out_dir)
        self.device = loaded.device
        self.loader = loader if loader is not None else ImageLoader(loaded)
        self.on_step, self.on_epoch = on_step, on_epoch
        self.history: List[Dict[str, Any]] = []
        # what one epoch runs over: images (classification, or one caption per image), or (image, caption)
        if self.task == "retrieval" and self.cfg.caption_sampling == "all":
            self.samples: List[Tuple[int, int]] = [(i, c) for i, it in enumerate(data.train)
                                                   for c in range(len(it.captions))]
        else:
            self.samples = [(i, -1) for i in range(len(data.train))]

    # -- setup ------------------------------------------------------------------------------------------------
    def _build(self, method_config: Dict[str, Any]) -> AdaptedModel:
        torch.manual_seed(self.cfg.seed)
        return self.spec.build(self.loaded, self.spec.config_cls(**method_config))

    def _optimizer(self, model: AdaptedModel) -> torch.optim.Optimizer:
        params = [p for _, p in model.adapter_named_parameters()]
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, weight_decay=self.cfg.weight_decay)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def lr_at(self, epoch: int, step: int, total: int) -> float:
        """The learning rate of ``step`` (of ``total``), in epoch ``epoch`` (0-based)."""
        cfg = self.cfg
        if cfg.schedule == "dassl":  # ConstantWarmupScheduler + CosineAnnealingLR(T_max=epochs), per epoch
            if epoch < cfg.warmup_epochs:
                return cfg.warmup_lr
            return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        t = (step - self.cfg.warmup_steps) / max(1, total - self.cfg.warmup_steps)
        return 0.5 * self.cfg.lr * (1.0 + math.cos(math.pi * min(1.0, t)))

    def _steps_per_epoch(self) -> int:
        n = len(self.samples)
        steps = max(1, math.ceil(n / self.cfg.batch_size))
        return min(steps, self.cfg.max_steps_per_epoch or steps)

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    # -- one step -------------------------------------------------------------------------------------------------
    def caption_batch(self, idx: Sequence[int], gen: torch.Generator) -> Tuple[List[Any], List[str]]:
        """(image paths, captions) of a batch of ``samples`` indices (a random caption when sampling one)."""
        paths, captions = [], []
        for i in idx:
            item, c = self.samples[i]
            it = self.data.train[item]
            paths.append(it.path)
            captions.append(it.captions[c if c >= 0 else int(torch.randint(len(it.captions), (1,), generator=gen))])
        return paths, captions

    def loss(self, model: AdaptedModel, idx: Sequence[int],
             gen: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        if self.task == "classification":
            paths = [self.data.train[self.samples[i][0]][0] for i in idx]
            labels = torch.tensor([self.data.train[self.samples[i][0]][1] for i in idx], device=self.device)
        else:
            paths, captions = self.caption_batch(idx, gen)
        x = self.loader.batch(paths)
        if self.cfg.augment:
            x = augment(x, gen) if self.cfg.augmentation == "rs" else random_resized_crop_flip(x, gen)
        x = x.to(self.device)
        scale = temperature(model.logit_scale.detach().float())
        with self._autocast():
            if self.task == "classification":
                classes = self.data.classes
                if self.spec.prompt_learner:
                    logits = model.class_logits(x, classes)
                else:
                    prompts = [self.cfg.train_template.format(normalize_classname(c)) for c in classes]
                    txt = model.encode_text(self.loaded.tokenizer(prompts).to(self.device), normalize=True)
                    logits = scale * model.encode_image(x, normalize=True) @ txt.T
                loss = prompt_ce(logits.float(), labels)
                return loss, {"ce": float(loss.detach())}
            tokens = self.loaded.tokenizer(captions).to(self.device)
            img = F.normalize(model.encode_image(x).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
            if self.cfg.loss == "infonce":
                loss = info_nce(img, txt, scale)
                return loss, {"infonce": float(loss.detach())}
            p = self.cfg.hmmc_dropout
            img_aug = F.normalize(model.encode_image(x, embed_dropout=p).float(), dim=-1)
            txt_aug = F.normalize(model.encode_text(tokens, embed_dropout=p).float(), dim=-1)
            return hmmc_loss(img, img_aug, txt, txt_aug, scale, self.cfg.hmmc_weights)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, model: AdaptedModel) -> Dict[str, Any]:
        if not self.data.held_out:
            return {}
        if self.task == "classification":
            r = evaluate_zeroshot(model, self.loaded.tokenizer, self.data.held_out, self.data.classes,
                                  self.loader.batch, self.cfg.eval_templates, batch_size=self.cfg.eval_batch_size)
            return {"top1": r["top1"], "n": r["n"]}
        return evaluate_retrieval(model, self.loaded.tokenizer, self.data.held_out, self.loader.batch,
                                  batch_size=self.cfg.eval_batch_size)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: AdaptedModel, opt, epoch: int, step: int) -> None:
        payload = {"epoch": epoch, "step": step, "train_config": _jsonable(asdict(self.cfg)),
                   "method_config": model.config.to_dict(), "adapter": model.adapter_state_dict(),
                   "optimizer": opt.state_dict(), "history": _jsonable(self.history)}
        with atomic_file(self.out / "checkpoint.pt") as f:
            torch.save(payload, f)

    def _log_metrics(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        start_epoch, step = 0, 0
        ckpt_path = self.out / "checkpoint.pt"
        if cfg.resume and ckpt_path.is_file():
            ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
            if ckpt["train_config"]["method"] != cfg.method:
                raise AdapterError(f"{ckpt_path} is a {ckpt['train_config']['method']} run, not {cfg.method}")
            model = self._build(ckpt["method_config"])
            model.load_adapter_state(ckpt["adapter"])
            opt = self._optimizer(model)
            opt.load_state_dict(ckpt["optimizer"])
            start_epoch, step, self.history = int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"])
            self.log(f"resuming {cfg.method} from epoch {start_epoch} ({ckpt_path})")
        else:
            if (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
            model = self._build(dict(cfg.method_config))
            opt = self._optimizer(model)
            if not self.data.held_out:
                self.log("warning: no held-out data is left for evaluation (every image went into training): "
                         "pass --val-data DIR, fewer --shots, or caption data with a val/test split; "
                         "training continues without evaluation")
            before = self.evaluate(model)
            self._log_metrics({"epoch": 0, "eval": before})
            self.log(f"epoch 0 (before training): {_fmt(before)}")
        steps_per_epoch = self._steps_per_epoch()
        total = steps_per_epoch * cfg.epochs
        scaler = torch.amp.GradScaler("cuda") if (cfg.amp and self.device.type == "cuda" and
                                                  not torch.cuda.is_bf16_supported()) else None
        for epoch in range(start_epoch, cfg.epochs):
            torch.manual_seed(cfg.seed * 100003 + epoch)
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            model.train()
            t0, losses, parts = time.time(), [], {}
            bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress)
            for i, idx in enumerate(batches(len(self.samples), cfg.batch_size, gen)):
                if i >= steps_per_epoch:
                    break
                for g in opt.param_groups:
                    g["lr"] = self.lr_at(epoch, step, total)
                loss, part = self.loss(model, idx, gen)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                step += 1
                losses.append(float(loss.detach()))
                for k, v in part.items():
                    parts[k] = parts.get(k, 0.0) + v
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if self.on_step is not None:
                    self.on_step(epoch, i, steps_per_epoch, losses[-1])
            bar.close()
            record = {"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses)),
                      "loss_parts": {k: v / max(1, len(losses)) for k, v in parts.items()},
                      "lr": self.lr_at(epoch, step - 1, total), "seconds": round(time.time() - t0, 3)}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                record["eval"] = self.evaluate(model)
            self._log_metrics(record)
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} {_fmt(record.get('eval', {}))}")
            self._save_checkpoint(model, opt, epoch + 1, step)
            if self.on_epoch is not None:
                self.on_epoch(record)
            if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch:
                self.log(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
                break
        model.eval()
        extra = {"training": {"task": self.task, "epochs": cfg.epochs, "seed": cfg.seed, "loss": cfg.loss,
                              "train_size": len(self.data.train), "final": self.history[-1].get("eval", {})}}
        if self.task == "classification":
            extra["classes"] = list(self.data.classes)
        adapter_path = save_adapter(self.out / "adapter.pt", model, extra=_jsonable(extra))
        self.model = model
        return {"adapter": str(adapter_path), "metrics": str(self.out / "metrics.jsonl"),
                "history": self.history,
                "trainable_parameters": sum(p.numel() for _, p in model.adapter_named_parameters())}


def _fmt(metrics: Dict[str, Any]) -> str:
    keys = [k for k in ("top1", "mr", "i2t_r1", "t2i_r1") if k in metrics]
    return " ".join(f"{k} {metrics[k]:.2f}" for k in keys)


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n=1): pass
            def set_postfix(self, **kw): pass
            def close(self): pass
        return _Null()
