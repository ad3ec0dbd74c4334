"""``python -m backend train``: train a PEFT adapter (LoRA, MRS-Adapter, GDPL, CoOp) on a base model."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_method_config_flags, add_model_flags, emit, fail, load_base, method_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a PEFT adapter (lora, mrs-adapter, gdpl, coop)",
                              description="Train an adapter; writes OUT/adapter.pt, OUT/metrics.jsonl and "
                                          "OUT/checkpoint.pt (for --resume).")
    p.add_argument("--method", required=True, help="lora | mrs-adapter | gdpl | coop")
    p.add_argument("--data", required=True, help="Karpathy .json, filename,title .csv, or an ImageFolder directory")
    p.add_argument("--format", default="auto", choices=["auto", "karpathy", "csv", "imagefolder"])
    p.add_argument("--images-dir", help="where the caption files' images are (default: beside the file)")
    p.add_argument("--eval-split", help="Karpathy split to evaluate on each epoch (default val, else test)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="CSV: share of images held out (default 0.1)")
    p.add_argument("--val-data", help="ImageFolder of held-out images (default: images not drawn as shots)")
    p.add_argument("--shots", type=int, help="ImageFolder: images per class (default: the method's, 16; 0 = all)")
    p.add_argument("--held-out-per-class", type=int, default=50, help="cap on held-out images per class")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--loss", choices=["infonce", "hmmc", "ce"])
    p.add_argument("--hmmc-weights", default="1,1,1", help="image-image, image-text, text-text (default 1,1,1)")
    p.add_argument("--warmup-steps", type=int, default=0, help="schedule 'steps': linear warm-up steps")
    p.add_argument("--schedule", choices=["steps", "dassl"], help="steps: cosine per step after --warmup-steps; "
                   "dassl: --warmup-epochs at --warmup-lr, then cosine per epoch (default for gdpl and coop)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="schedule 'dassl': constant warm-up epochs")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="schedule 'dassl': the warm-up learning rate")
    p.add_argument("--augmentation", choices=["rs", "dassl"], help="rs: flips and quarter turns; dassl: random "
                   "resized crop + flip (default for gdpl and coop)")
    p.add_argument("--caption-sampling", choices=["all", "one"], default="all",
                   help="retrieval: every caption once per epoch (all, GaLR/PE-RSITR) or one random caption per "
                        "image (one)")
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-after-epoch", type=int, help="stop after this epoch (continue later with --resume)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--no-augment", action="store_true", help="no random flips / quarter turns")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eval-templates", default="georsclip", help="template set for per-epoch zero-shot eval")
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    add_method_config_flags(p)
    add_model_flags(p)
    p.set_defaults(func=run)
    return p


def load_data(args: argparse.Namespace, shots: int):
    from backend.training.data import read_captions, read_image_folder, split_captions
    path = Path(args.data)
    fmt = args.format
    if fmt == "auto":
        fmt = "imagefolder" if path.is_dir() else path.suffix.lower().lstrip(".")
    if fmt == "imagefolder":
        return read_image_folder(path, shots=shots or None, seed=args.seed,
                                 held_out_per_class=args.held_out_per_class, val_root=args.val_data)
    items = read_captions(path, args.images_dir, {"karpathy": "json"}.get(fmt, fmt))
    return split_captions(items, args.eval_split, args.val_fraction, args.seed)


def run(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    from backend.errors import BackendError
    from backend.adapters import get_method
    from backend.training.data import DataError
    from backend.training.trainer import TrainConfig, Trainer
    try:
        spec = get_method(args.method)
        mcfg = method_config(spec, args)
        weights = tuple(float(w) for w in args.hmmc_weights.split(","))
        data = load_data(args, args.shots if args.shots is not None else spec.defaults.get("shots", 16))
        loaded = load_base(args)
        cfg = TrainConfig(method=spec.name, out_dir=args.out, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, optimizer=args.optimizer, weight_decay=args.weight_decay,
                          loss=args.loss, hmmc_weights=weights, warmup_steps=args.warmup_steps, seed=args.seed,
                          schedule=args.schedule, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                          augmentation=args.augmentation, caption_sampling=args.caption_sampling,
                          amp=not args.no_amp, augment=not args.no_augment, eval_templates=args.eval_templates,
                          max_steps_per_epoch=args.max_steps_per_epoch, resume=args.resume,
                          stop_after_epoch=args.stop_after_epoch,
                          progress=not args.no_progress, method_config=mcfg)
        trainer = Trainer(loaded, cfg, data)
        result = trainer.run()
    except (BackendError, ProtocolError) as exc:
        return fail(exc.message)
    except (DataError, ValueError, OSError) as exc:
        return fail(str(exc))
    hist = result["history"]
    lines = [f"{'epoch':>5} {'loss':>8}  eval"]
    for h in hist:
        ev = h.get("eval", {})
        shown = " ".join(f"{k}={ev[k]:.2f}" for k in ("top1", "mr", "i2t_r1", "t2i_r1") if k in ev)
        lines.append(f"{h['epoch']:>5} {h.get('loss', float('nan')):>8.4f}  {shown}")
    lines.append(f"adapter: {result['adapter']} ({result['trainable_parameters']} trainable parameters)")
    lines.append(f"metrics: {result['metrics']}")
    emit(args, lines, {"adapter": result["adapter"], "metrics": result["metrics"], "method": spec.name,
                       "trainable_parameters": result["trainable_parameters"],
                       "final": hist[-1].get("eval", {}), "initial": hist[0].get("eval", {}), "epochs": len(hist) - 1})
    return 0
