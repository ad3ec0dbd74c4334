"""Losses against hand-worked values, dataset readers, and short trainings that must improve every method."""
from __future__ import annotations

import json
import math

import pytest
import torch

from backend.training.data import (DataError, ImageLoader, read_caption_csv, read_captions, read_image_folder,
                                   read_karpathy, split_captions)
from backend.training.losses import hmmc_loss, info_nce, prompt_ce, temperature
from backend.training.trainer import TrainConfig, Trainer


# -- losses ---------------------------------------------------------------------------------------------------
def test_info_nce_hand_worked():
    a = torch.eye(2)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = 2 * I: each row's CE = -log(e^2 / (e^2 + e^0))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert info_nce(a, b, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # asymmetric case: both directions averaged
    b2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # logits [[1,1],[0,0]] (scale 1)
    row = 0.5 * (2 * -math.log(0.5))  # image->text: rows [1,1] and [0,0]: both log 2
    col = 0.5 * (-math.log(math.exp(1) / (math.exp(1) + 1)) - math.log(1 / (math.exp(1) + 1)))
    assert info_nce(a, b2, 1.0).item() == pytest.approx(0.5 * (row + col), rel=1e-6)


def test_hmmc_weights_and_terms():
    g = torch.Generator().manual_seed(0)
    f = [torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(4)]
    img, img_aug, txt, txt_aug = f
    total, parts = hmmc_loss(img, img_aug, txt, txt_aug, 10.0)
    ii, it, tt = info_nce(img, img_aug, 10.0), info_nce(img, txt, 10.0), info_nce(txt, txt_aug, 10.0)
    assert total.item() == pytest.approx((ii + it + tt).item() / 3, rel=1e-6)
    assert parts == pytest.approx({"ii": ii.item(), "it": it.item(), "tt": tt.item()})
    only_it, _ = hmmc_loss(img, img_aug, txt, txt_aug, 10.0, weights=(0, 1, 0))
    assert only_it.item() == pytest.approx(it.item(), rel=1e-6)
    with pytest.raises(ValueError):
        hmmc_loss(img, img_aug, txt, txt_aug, 10.0, weights=(1, -1, 0))
    assert temperature(torch.tensor(math.log(1 / 0.07))).item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert temperature(torch.tensor(10.0)).item() == 100.0


def test_prompt_ce():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert prompt_ce(logits, torch.tensor([0, 0])).item() == pytest.approx(
        0.5 * (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (math.exp(2) + 1))), rel=1e-6)


# -- data -------------------------------------------------------------------------------------------------------
def test_karpathy_and_csv_readers(colour_data):
    items = read_karpathy(colour_data / "captions.json")
    assert len(items) == 48 and items[0].captions == ["a red area", "the red image"]
    assert items[0].path == colour_data / "red_0.png" and items[0].path.is_file()
    split = split_captions(items)
    assert split.held_out_name == "test" and len(split.train) == 32 and len(split.held_out) == 16
    csv_items = read_caption_csv(colour_data / "captions.csv")
    assert [(i.path, i.captions) for i in csv_items] == [(i.path, i.captions) for i in items]
    a, b = split_captions(csv_items, seed=1), split_captions(csv_items, seed=1)
    assert [i.path for i in a.held_out] == [i.path for i in b.held_out] and len(a.held_out) == 5
    assert not {i.path for i in a.held_out} & {i.path for i in a.train}
    with pytest.raises(DataError):
        read_captions(colour_data / "red_0.png")


def test_image_folder_n_shot_sampling_is_seeded(colour_data):
    d1 = read_image_folder(colour_data / "folder", shots=3, seed=7, held_out_per_class=4)
    d2 = read_image_folder(colour_data / "folder", shots=3, seed=7, held_out_per_class=4)
    d3 = read_image_folder(colour_data / "folder", shots=3, seed=8, held_out_per_class=4)
    assert d1.classes == ["blue", "green", "red", "yellow"]
    assert d1.train == d2.train and d1.train != d3.train
    assert len(d1.train) == 12 and len(d1.held_out) == 16
    assert sorted(label for _, label in d1.train) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert not {p for p, _ in d1.train} & {p for p, _ in d1.held_out}
    full = read_image_folder(colour_data / "folder")
    assert len(full.train) == 48 and not full.held_out


def test_image_loader_matches_model_preprocessing(colour_data, tiny):
    x = ImageLoader(tiny).batch([colour_data / "red_0.png", colour_data / "blue_1.png"])
    assert x.shape == (2, 3, 32, 32)
    red = x[0].mean(dim=(1, 2))
    assert red[0] > red[1] and red[0] > red[2]  # red channel brightest after normalisation


# -- training improves every method -------------------------------------------------------------------------
CASES = {
    "coop": ("classes", dict(epochs=4, lr=0.01, batch_size=8)),
    "gdpl": ("classes", dict(epochs=4, lr=0.01, batch_size=8,
                             method_config={"domain_model": "tiny-quickgelu", "domain_random_weights": True})),
    "lora": ("captions", dict(epochs=4, lr=0.003, batch_size=8)),
    "mrs-adapter": ("captions", dict(epochs=4, lr=0.01, batch_size=8)),
}


def _data(colour_data, kind):
    if kind == "classes":
        return read_image_folder(colour_data / "folder", shots=4, seed=0)
    return split_captions(read_captions(colour_data / "captions.json"))


@pytest.mark.parametrize("method", sorted(CASES))
def test_short_training_improves_held_out(method, colour_data, tiny, tmp_path):
    kind, kw = CASES[method]
    cfg = TrainConfig(method=method, out_dir=str(tmp_path), progress=False, eval_templates="simple", **kw)
    result = Trainer(tiny, cfg, _data(colour_data, kind), log=lambda s: None).run()
    key = "top1" if kind == "classes" else "mr"
    before, after = result["history"][0]["eval"][key], result["history"][-1]["eval"][key]
    assert after > before + 10, f"{method}: {key} {before:.1f} -> {after:.1f}"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == list(range(kw["epochs"] + 1))
    assert (tmp_path / "adapter.pt").is_file() and (tmp_path / "checkpoint.pt").is_file()
    if method == "mrs-adapter":
        assert cfg.resolved().loss == "hmmc" and set(lines[1]["loss_parts"]) == {"ii", "it", "tt"}


def test_mrs_adapter_on_classes_with_ce(colour_data, tiny, tmp_path):
    cfg = TrainConfig(method="mrs-adapter", out_dir=str(tmp_path), progress=False, eval_templates="simple",
                      epochs=3, lr=0.003, batch_size=8)
    hist = Trainer(tiny, cfg, _data(colour_data, "classes"), log=lambda s: None).run()["history"]
    assert hist[-1]["eval"]["top1"] > hist[0]["eval"]["top1"]


def test_resume_equals_uninterrupted_training(colour_data, tiny, tmp_path):
    data = _data(colour_data, "captions")
    kw = dict(method="lora", progress=False, lr=0.003, batch_size=8, eval_templates="simple")
    full = Trainer(tiny, TrainConfig(out_dir=str(tmp_path / "a"), epochs=2, **kw), data, log=lambda s: None)
    full.run()
    first = Trainer(tiny, TrainConfig(out_dir=str(tmp_path / "b"), epochs=2, stop_after_epoch=1, **kw), data,
                    log=lambda s: None)
    first.run()
    resumed = Trainer(tiny, TrainConfig(out_dir=str(tmp_path / "b"), epochs=2, resume=True, **kw), data,
                      log=lambda s: None)
    res = resumed.run()
    sa, sb = full.model.adapter_state_dict(), resumed.model.adapter_state_dict()
    sf = first.model.adapter_state_dict()
    assert not all(torch.allclose(sa[k], sf[k], atol=1e-6) for k in sa)  # the second epoch did change it
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]


def test_prompt_learners_need_classes(colour_data, tiny, tmp_path):
    from backend.adapters import AdapterError
    with pytest.raises(AdapterError, match="ImageFolder"):
        Trainer(tiny, TrainConfig(method="coop", out_dir=str(tmp_path)), _data(colour_data, "captions"))
