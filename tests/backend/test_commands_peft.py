"""``train``, ``eval`` and ``params`` subcommands, parsed as the lead's cli registers them."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from backend.commands import eval as eval_cmd
from backend.commands import params as params_cmd
from backend.commands import train as train_cmd

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

TINY = ["--model", "tiny", "--random-weights", "--device", "cpu"]


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="backend")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in (train_cmd, eval_cmd, params_cmd):
        mod.add_parser(sub)
    args = parser.parse_args(argv)
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_params_counts(capsys):
    rc, out, _ = _run(["params", "--model", "ViT-B-32", "--method", "mrs-adapter", "--json"], capsys)
    assert rc == 0
    res = _last_json(out)
    assert res["trainable"] == 161_088 and res["method"] == "mrs-adapter"
    assert "trainable 161,088" in out
    rc, out, _ = _run(["params", "--model", "tiny", "--method", "lora", "--set", "r=2", "--set", "targets=attn,mlp",
                       "--json"], capsys)
    res = _last_json(out)
    # per block: attn in_proj (64->192) + out_proj (64->64) + c_fc (64->256) + c_proj (256->64), rank 2
    per_block = 2 * (64 + 192) + 2 * (64 + 64) + 2 * (64 + 256) + 2 * (256 + 64)
    assert res["trainable"] == 4 * per_block
    rc, out, _ = _run(["params", "--model", "tiny", "--method", "full", "--json"], capsys)
    assert _last_json(out)["trainable"] == _last_json(out)["total"]
    rc, _, err = _run(["params", "--model", "tiny", "--method", "vpt"], capsys)
    assert rc == 2 and "unknown adaptation method" in err


def test_train_then_eval_zeroshot_and_resume(colour_data, tmp_path, capsys):
    out_dir = tmp_path / "coop"
    argv = ["train", "--method", "coop", "--data", str(colour_data / "folder"), "--shots", "4", "--out", str(out_dir),
            "--epochs", "3", "--lr", "0.01", "--batch-size", "8", "--eval-templates", "simple", "--no-progress",
            "--seed", "1", "--schedule", "steps", "--augmentation", "rs", "--json", *TINY]  # resume mechanics
    rc, out, _ = _run(argv[:-len(TINY)] + ["--stop-after-epoch", "1"] + TINY, capsys)
    assert rc == 0 and _last_json(out)["epochs"] == 1
    rc, out, err = _run(argv + ["--resume"], capsys)
    assert rc == 0, err
    res = _last_json(out)
    assert "resuming coop from epoch 1" in err and res["epochs"] == 3
    assert res["final"]["top1"] > res["initial"]["top1"]
    adapter = res["adapter"]
    rc, out, _ = _run(["eval", "zeroshot", "--data", str(colour_data / "folder"), "--adapter", adapter,
                       "--json", *TINY], capsys)
    assert rc == 0
    z = _last_json(out)
    assert z["n"] == 48 and z["classes"] == 4 and z["adapter"] == adapter and 0 <= z["top1"] <= 100
    assert "overall (48 images)" in out
    rc, out, _ = _run(["eval", "zeroshot", "--data", str(colour_data / "folder"), "--templates", "simple",
                       "--max-per-class", "2", "--json", *TINY], capsys)
    assert _last_json(out)["n"] == 8


def test_train_lora_on_csv_then_eval_retrieval(colour_data, tmp_path, capsys):
    rc, out, err = _run(["train", "--method", "lora", "--data", str(colour_data / "captions.csv"), "--out",
                         str(tmp_path / "l"), "--epochs", "2", "--lr", "0.003", "--batch-size", "8", "--no-progress",
                         "--set", "r=4", "--json", *TINY], capsys)
    assert rc == 0, err
    res = _last_json(out)
    lines = (tmp_path / "l" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "mr" in json.loads(lines[-1])["eval"]
    rc, out, _ = _run(["eval", "retrieval", "--data", str(colour_data / "captions.json"), "--adapter", res["adapter"],
                       "--json", *TINY], capsys)
    assert rc == 0
    r = _last_json(out)
    assert r["images"] == 16 and r["texts"] == 32
    assert r["mr"] == pytest.approx(sum(r[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6)
    assert "image->text" in out


def test_eval_selo(tmp_path, capsys):
    yy, xx = np.mgrid[0:400, 0:400]
    prob = np.exp(-((xx - 200) ** 2 + (yy - 200) ** 2) / (2 * 30.0 ** 2))
    np.save(tmp_path / "h.npy", prob)
    anno = [{"caption": "a pond", "jpg_name": "7.jpg", "points": [[[170, 170], [230, 170], [230, 230], [170, 230]]]}]
    (tmp_path / "a.json").write_text(json.dumps(anno))
    rc, out, _ = _run(["eval", "selo", "--heatmap", str(tmp_path / "h.npy"), "--annotations", str(tmp_path / "a.json"),
                       "--image", "7.jpg", "--json"], capsys)
    assert rc == 0
    res = _last_json(out)
    assert set(res) >= {"rsu", "ras", "rda", "rmi"} and res["rda"] == 1.0 and "Rmi" in out
    rc, out, _ = _run(["eval", "selo", "--heatmap", str(tmp_path / "h.npy"), "--annotations", str(tmp_path / "a.json"),
                       "--image", "7.jpg", "--reference-jpeg", "--json"], capsys)
    from backend.evaluation import selo
    again = selo.selo_metrics(selo.jpeg_round_trip(prob), anno[0]["points"])
    jpeg = _last_json(out)
    assert rc == 0 and jpeg["reference_jpeg"] and all(jpeg[k] == pytest.approx(again[k]) for k in ("rsu", "ras", "rda"))
    assert jpeg["rsu"] != res["rsu"]  # the 8-bit JPEG map is not the float map
    rc, _, err = _run(["eval", "selo", "--heatmap", str(tmp_path / "h.npy"), "--annotations",
                       str(tmp_path / "a.json"), "--image", "8.jpg"], capsys)
    assert rc == 2 and "no annotation" in err


def test_train_refuses_bad_input(colour_data, tmp_path, capsys):
    rc, _, err = _run(["train", "--method", "gdpl", "--data", str(colour_data / "captions.json"), "--out",
                       str(tmp_path), *TINY], capsys)
    assert rc == 2 and "ImageFolder" in err
    rc, _, err = _run(["train", "--method", "lora", "--data", str(colour_data / "folder"), "--out", str(tmp_path),
                       "--set", "rank=3", *TINY], capsys)
    assert rc == 2 and "settings are" in err


def test_python_m_backend_registers_the_commands():
    proc = subprocess.run([sys.executable, "-m", "backend", "params", "--model", "tiny", "--method", "mrs-adapter",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["trainable"] == 14_560
