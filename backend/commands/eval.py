"""``python -m backend eval zeroshot|retrieval|selo``: metrics as a table, or one JSON object (``--json``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_model_flags, emit, fail, load_base


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate: zero-shot top-1, retrieval recall, SeLo metrics")
    sub = p.add_subparsers(dest="eval_task", required=True)

    z = sub.add_parser("zeroshot", help="zero-shot top-1 on an ImageFolder")
    z.add_argument("--data", required=True, help="ImageFolder: DIR/CLASS/*.png|jpg|tif")
    z.add_argument("--templates", default="georsclip", help="template set (georsclip, remoteclip, skyclip, simple)")
    z.add_argument("--ensemble", default="georsclip", choices=["georsclip", "openclip"])
    z.add_argument("--max-per-class", type=int, help="evaluate at most N images per class")
    z.add_argument("--predictions", metavar="CSV", help="write each image's prediction: file,label,predicted")
    _common(z)
    z.set_defaults(func=run_zeroshot)

    r = sub.add_parser("retrieval", help="image-text retrieval R@1/5/10 both ways and mR")
    r.add_argument("--data", required=True, help="Karpathy .json or filename,title .csv")
    r.add_argument("--images-dir", help="where the images are (default: beside the file)")
    r.add_argument("--split", default="test", help="Karpathy split to evaluate ('all' for every image)")
    _common(r)
    r.set_defaults(func=run_retrieval)

    s = sub.add_parser("selo", help="semantic localization metrics of a heatmap against AIR-SLT annotations")
    s.add_argument("--heatmap", required=True, help="probability map: .npy, .tif or .png")
    s.add_argument("--annotations", required=True, help="AIR-SLT annotations JSON")
    s.add_argument("--image", required=True, help="the annotated image's file name (jpg_name)")
    s.add_argument("--caption", help="the query (text or 0-based index) when the image has several")
    s.add_argument("--reference-jpeg", action="store_true",
                   help="measure the map as the original does: uint8(255 p) written as an OpenCV JPEG (quality 95) "
                        "and read back as grey / 255")
    s.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    s.set_defaults(func=run_selo)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="FILE", help="evaluate this adapter on the base model (zero-shot: classified "
                   "as the served classify does, e.g. with an instant adapter's own head)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    add_model_flags(p)


def _model(args):
    loaded = load_base(args)
    if args.adapter:
        from backend.adapters import load_adapter
        return loaded, load_adapter(args.adapter, loaded)
    return loaded, loaded.model


def run_zeroshot(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    from backend.errors import BackendError
    from backend.evaluation.zeroshot import evaluate_zeroshot
    from backend.training.data import DataError, ImageLoader, list_image_folder
    try:
        classes, files = list_image_folder(args.data)
        samples = [(p, k) for k, c in enumerate(classes) for p in files[c][:args.max_per_class]]
        loaded, model = _model(args)
        res = evaluate_zeroshot(model, loaded.tokenizer, samples, classes, ImageLoader(loaded, cache=False).batch,
                                args.templates, args.ensemble, args.batch_size)
        predictions = res.pop("predictions")
        if args.predictions:
            write_predictions(args.predictions, samples, classes, predictions)
    except (BackendError, ProtocolError) as exc:
        return fail(exc.message)
    except (DataError, ValueError, OSError) as exc:
        return fail(str(exc))
    lines = [f"{'class':32} {'top-1 %':>8}"] + [f"{c:32} {v:8.2f}" for c, v in res["per_class"].items()]
    lines.append(f"{'overall (' + str(res['n']) + ' images)':32} {res['top1']:8.2f}")
    emit(args, lines, {"task": "zeroshot", "model": loaded.name, "adapter": args.adapter, **res})
    return 0


def write_predictions(path: str, samples, classes, predictions) -> None:
    """A CSV of ``file,label,predicted`` (class names), one row per image, written atomically."""
    import csv
    import io
    from backend.files import atomic_write
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "label", "predicted"])
    writer.writerows([str(p), classes[k], classes[j]] for (p, k), j in zip(samples, predictions, strict=True))
    atomic_write(path, out.getvalue().encode())


def run_retrieval(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    from backend.errors import BackendError
    from backend.evaluation.retrieval import evaluate_retrieval
    from backend.training.data import DataError, ImageLoader, read_captions
    try:
        items = read_captions(args.data, args.images_dir)
        if args.split != "all" and any(it.split != "all" for it in items):
            items = [it for it in items if it.split == args.split]
        if not items:
            raise DataError(f"{args.data}: no images in split {args.split!r}")
        loaded, model = _model(args)
        res = evaluate_retrieval(model, loaded.tokenizer, items, ImageLoader(loaded, cache=False).batch,
                                 args.batch_size)
    except (BackendError, ProtocolError) as exc:
        return fail(exc.message)
    except (DataError, ValueError, OSError) as exc:
        return fail(str(exc))
    lines = [f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}",
             f"{'image->text':14}" + "".join(f"{res[f'i2t_r{k}']:8.2f}" for k in (1, 5, 10)),
             f"{'text->image':14}" + "".join(f"{res[f't2i_r{k}']:8.2f}" for k in (1, 5, 10)),
             f"mR {res['mr']:.2f}  ({res['images']} images, {res['texts']} texts)"]
    emit(args, lines, {"task": "retrieval", "model": loaded.name, "adapter": args.adapter, **res})
    return 0


def run_selo(args: argparse.Namespace) -> int:
    from backend.evaluation.selo import jpeg_round_trip, read_annotations, read_heatmap, selo_metrics
    try:
        prob = read_heatmap(args.heatmap)
        if args.reference_jpeg:
            prob = jpeg_round_trip(prob)
        caption, regions = read_annotations(args.annotations, args.image, args.caption)
        res = selo_metrics(prob, regions)
    except (ValueError, OSError, KeyError) as exc:
        return fail(str(exc))
    lines = [f"{Path(args.image).name}: {caption!r} ({len(regions)} regions, {len(res['centres'])} attention centres)",
             f"Rsu {res['rsu']:.4f} (higher is better)", f"Ras {res['ras']:.4f} (lower is better)",
             f"Rda {res['rda']:.4f} (higher is better)", f"Rmi {res['rmi']:.4f} (higher is better)"]
    emit(args, lines, {"task": "selo", "image": args.image, "caption": caption, "reference_jpeg": args.reference_jpeg,
                       **res})
    return 0
