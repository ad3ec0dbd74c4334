"""``python -m backend reproduce georsclip`` on a miniature RS5M test bundle (the exact folder layout and file
formats: ImageFolders, filename,title CSVs with RSICD's in gb18030, AIR-SLT annotations), on the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from backend.cli import main
from backend.evaluation import reproduce as rp

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny", "--random-weights", "--device", "cpu"]


def _jpg(path: Path, rng, size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = cv2.GaussianBlur(rng.random((*size, 3)), (0, 0), 3)
    cv2.imwrite(str(path), np.uint8(255 * (img - img.min()) / (img.max() - img.min())))


def make_bundle(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for folder, classes in (("AID", ["Airport", "BareLand", "Beach"]), ("RESISC45", ["airplane", "basketball_court"]),
                            ("eurosat-rgb/2750", ["AnnualCrop", "HerbaceousVegetation"])):
        for c in classes:
            for k in range(2):
                _jpg(root / folder / c / f"{c.lower()}_{k}.jpg", rng)
    captions = {"a.jpg": ["many planes are parked", "an airport near a road"],
                "b.jpg": ["a green park with trees", "some trees around a lawn"],
                "c.jpg": ["a river crosses the town", "a bridge over the river"]}
    for name, folder, encoding, extra in (("rsitmd", "images", "utf-8", ""), ("rsicd", "RSICD_images", "gb18030",
                                                                                " – 河边")):
        lines = ["filename,title"] + [f"{f},{c}{extra}" for f, caps in captions.items() for c in caps]
        (root / name).mkdir(parents=True)
        (root / name / f"{name}_test.csv").write_bytes(("\n".join(lines) + "\n").encode(encoding))
        for f in captions:
            _jpg(root / name / folder / f, rng)
    _jpg(root / "AIR-SLT" / "imgs" / "0.jpg", rng, size=(800, 800))
    anno = [{"caption": "there is a green pond next to the gray road.\n", "jpg_name": "0.jpg",
             "points": [[[100.5, 120.2], [300.7, 110.1], [310.2, 330.9], [90.4, 320.3]]]},
            {"caption": "a white house", "jpg_name": "0.jpg",
             "points": [[[500.0, 500.0], [700.0, 520.0], [690.0, 710.0], [510.0, 690.0]],
                        [[40.0, 600.0], [200.0, 600.0], [200.0, 760.0], [40.0, 760.0]]]}]
    (root / "AIR-SLT" / "annotations").mkdir(parents=True)
    (root / "AIR-SLT" / "annotations" / "anno.json").write_text(json.dumps(anno), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """One set of tiny random weights for every run of a test (a checkpoint the test makes)."""
    import torch
    from backend.models import load_model
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(load_model("tiny", random_weights=True, device="cpu").model.state_dict(), path)
    return ["--model", "tiny", "--checkpoint", str(path), "--device", "cpu"]


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_reproduce_runs_the_whole_table_on_a_miniature_bundle(tmp_path, capsys, tiny_ckpt):
    data = make_bundle(tmp_path / "rs5m_test_data")
    rc, out, err = _run(["reproduce", "georsclip", "--data", str(data), "--json", *tiny_ckpt], capsys)
    assert rc == 0, err
    table = json.loads(out.strip().splitlines()[-1])
    assert list(table) == ["aid", "resisc45", "eurosat", "rsitmd", "rsicd", "air-slt"]
    assert table["aid"]["classes"] == 3 and table["aid"]["images"] == 6
    assert table["eurosat"]["classes"] == 2 and 0 <= table["eurosat"]["top1"] <= 100
    for name in ("rsitmd", "rsicd"):
        r = table[name]
        assert r["images"] == 3 and r["texts"] == 6
        assert r["mr"] == pytest.approx(sum(r[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6)
    selo = table["air-slt"]
    assert selo["queries"] == 2 and all(0 <= selo[k] <= 1 for k in ("rsu", "rda", "ras"))
    assert selo["rmi"] == pytest.approx(0.4 * selo["rsu"] + 0.35 * (1 - selo["ras"]) + 0.25 * selo["rda"])
    assert "aid" in out and "published" in out
    # the zero-shot numbers are the served path's: the same as `eval zeroshot` on the same folder
    rc, out, _ = _run(["eval", "zeroshot", "--data", str(data / "AID"), "--json", *tiny_ckpt], capsys)
    assert json.loads(out.strip().splitlines()[-1])["top1"] == pytest.approx(table["aid"]["top1"])
    # the parent folder works too (the zip's top folder), and a missing part is skipped with a line
    import shutil
    shutil.rmtree(data / "eurosat-rgb")
    shutil.rmtree(data / "AIR-SLT")
    rc, out, _ = _run(["reproduce", "georsclip", "--data", str(tmp_path), "--json", *tiny_ckpt], capsys)
    table = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and "skipped" in table["eurosat"] and "skipped" in table["air-slt"] and "top1" in table["aid"]
    assert "eurosat    skipped:" in out


def test_rsicd_csv_is_read_as_gb18030(tmp_path):
    from backend.training.data import read_caption_csv
    make_bundle(tmp_path)
    items = read_caption_csv(tmp_path / "rsicd" / "rsicd_test.csv", tmp_path / "rsicd" / "RSICD_images",
                             encoding="gb18030")
    assert items[0].captions[0] == "many planes are parked – 河边"
    from backend.errors import DataError
    with pytest.raises(DataError, match="utf-8"):
        read_caption_csv(tmp_path / "rsicd" / "rsicd_test.csv")


def test_compare_with_the_published_numbers():
    lines, out = rp.compare({"aid": {"top1": 75.0}, "rsitmd": {k: 30.0 for k in
                                                                ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                                                                 "t2i_r10", "mr")}},
                            "georsclip-vit-b-32")
    assert out["aid"]["published"] == {"top1": 74.42} and out["aid"]["difference"]["top1"] == pytest.approx(0.58)
    assert out["rsitmd"]["difference"] == {"mr": pytest.approx(30.0 - 35.33)}
    assert "skipped" in out["air-slt"] and any(line.startswith("air-slt    skipped") for line in lines)


def test_offline_messages(tmp_path, capsys):
    rc, _, err = _run(["reproduce", "georsclip", "--data", str(tmp_path / "nothing"), *TINY], capsys)
    assert rc == 2 and "AIR-SLT/annotations/anno.json" in err and "rs5m_test_data.zip" in err
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "backend", "reproduce", "georsclip", "--data", str(tmp_path / "d"),
                           "--download", *TINY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "cannot download data/rs5m_test_data.zip from Zilun/GeoRSCLIP" in proc.stderr
    assert "eurosat-rgb/2750" in proc.stderr and "--checkpoint" in proc.stderr
