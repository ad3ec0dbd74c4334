"""Training recipes as the originals run them: every caption per epoch (GaLR / PE-RSITR), Dassl's warm-up +
cosine schedule and random resized crop + flip (CoOp, GDPL/MaPLe), CoOp's paper configuration."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from backend.adapters import build_adapter
from backend.training.data import random_resized_crop_flip, read_karpathy, split_captions
from backend.training.trainer import TrainConfig, Trainer


class DasslConstantWarmup:
    """Dassl's ``ConstantWarmupScheduler`` around ``CosineAnnealingLR``, transcribed (dassl/optim/lr_scheduler.py):
    stepped once per epoch."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.optimizer, self.successor, self.warmup_epoch, self.cons_lr = optimizer, successor, warmup_epoch, cons_lr
        self.last_epoch = 0
        for g in optimizer.param_groups:
            g["lr"] = cons_lr

    def step(self):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            lrs = self.successor.get_last_lr()
        else:
            self.last_epoch += 1
            lrs = self.successor.get_last_lr() if self.last_epoch >= self.warmup_epoch else \
                [self.cons_lr] * len(self.optimizer.param_groups)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("method", ["gdpl", "coop"])
def test_dassl_schedule_per_epoch(tiny, colour_data, tmp_path, method):
    from backend.training.data import read_image_folder
    data = read_image_folder(colour_data / "folder", shots=2, seed=0)
    trainer = Trainer(tiny, TrainConfig(method=method, out_dir=str(tmp_path), epochs=6, progress=False), data,
                      log=lambda s: None)
    assert trainer.cfg.schedule == "dassl" and trainer.cfg.augmentation == "dassl"
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=trainer.cfg.lr)
    sched = DasslConstantWarmup(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6), 1, 1e-5)
    for epoch in range(6):
        expected = opt.param_groups[0]["lr"]
        for step in (0, 3):  # constant within an epoch
            assert trainer.lr_at(epoch, epoch * 4 + step, 24) == pytest.approx(expected, rel=1e-9), epoch
        sched.step()
    assert trainer.lr_at(0, 0, 24) == 1e-5 and trainer.lr_at(1, 4, 24) == pytest.approx(trainer.cfg.lr)


def test_retrieval_epoch_runs_over_every_caption(tiny, colour_data, tmp_path):
    data = split_captions(read_karpathy(colour_data / "captions.json"))
    n_captions = sum(len(it.captions) for it in data.train)
    assert n_captions > len(data.train)
    trainer = Trainer(tiny, TrainConfig(method="lora", out_dir=str(tmp_path), batch_size=8, progress=False), data,
                      log=lambda s: None)
    assert trainer._steps_per_epoch() == math.ceil(n_captions / 8)
    gen = torch.Generator().manual_seed(0)
    from backend.training.data import batches
    seen = Counter()
    for idx in batches(len(trainer.samples), 8, gen):
        paths, captions = trainer.caption_batch(idx, gen)
        seen.update(zip(paths, captions))
    expected = Counter((it.path, c) for it in data.train for c in it.captions)
    assert seen == expected  # each (image, caption) exactly once
    one = Trainer(tiny, TrainConfig(method="lora", out_dir=str(tmp_path), batch_size=8, progress=False,
                                    caption_sampling="one"), data, log=lambda s: None)
    assert one._steps_per_epoch() == math.ceil(len(data.train) / 8)


def test_random_resized_crop_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    y = random_resized_crop_flip(x, g)
    assert y.shape == x.shape and not torch.equal(y, x)
    again = random_resized_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, again)  # reproducible from the generator
    # scale (1, 1) and ratio (1, 1): the whole image, flipped or not
    full = random_resized_crop_flip(x, torch.Generator().manual_seed(3), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for a, b in zip(full, x):
        assert torch.allclose(a, b, atol=1e-4) or torch.allclose(a, b.flip(2), atol=1e-4)


def test_coop_paper_configuration(tiny):
    paper = build_adapter("coop", tiny, variant="paper")
    assert paper.config.n_ctx == 16 and paper.config.ctx_init is None
    ctx = paper.adapter.ctx.detach()
    assert ctx.shape == (16, tiny.model.transformer.width) and 0.015 < float(ctx.std()) < 0.025
    assert paper.prefix == " ".join(["X"] * 16)  # "X X ... X {class}.": the class token at the end
    ours = build_adapter("coop", tiny)
    assert ours.config.variant == "satellite" and ours.prefix == "a satellite image of a"
