"""GDPL building blocks: quaternion linear layer, domain bias, coupled low-rank attention adaptation."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..towers import AdapterError


def hamilton_matrix(r: Tensor, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
    """The real (4o x 4n) matrix of left multiplication by the quaternion weights (o x n each)."""
    return torch.cat([
        torch.cat([r, -i, -j, -k], dim=1),
        torch.cat([i, r, -k, j], dim=1),
        torch.cat([j, k, r, -i], dim=1),
        torch.cat([k, -j, i, r], dim=1),
    ], dim=0)


def quaternion_glorot_(r: Tensor, i: Tensor, j: Tensor, k: Tensor, generator: Optional[torch.Generator] = None
                       ) -> None:
    """Quaternion Glorot init (Parcollet et al.): modulus ~ chi(4) * 1/sqrt(2 (n_in + n_out)), a random pure
    unit quaternion axis and a phase uniform in [-pi, pi]."""
    n_out, n_in = r.shape
    s = 1.0 / math.sqrt(2.0 * (n_in + n_out))
    with torch.no_grad():
        modulus = torch.randn(4, n_out, n_in, generator=generator).norm(dim=0) * s
        axis = torch.randn(3, n_out, n_in, generator=generator)
        axis = axis / axis.norm(dim=0).clamp_min(1e-12)
        phase = (torch.rand(n_out, n_in, generator=generator) * 2 - 1) * math.pi
        r.copy_(modulus * torch.cos(phase))
        for t, a in zip((i, j, k), axis):
            t.copy_(modulus * a * torch.sin(phase))


class QuaternionLinear(nn.Module):
    """Linear map on quaternion vectors: input = 4 components of in/4, output = 4 components of out/4.

    ``y = W x + b`` with ``W`` the Hamilton-product matrix ``[[r,-i,-j,-k],[i,r,-k,j],[j,k,r,-i],[k,-j,i,r]]``;
    it holds a quarter of the weights of a dense layer of the same size. The bias starts at 0.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if in_features % 4 or out_features % 4:
            raise AdapterError(f"quaternion layer sizes must be divisible by 4, got {in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features // 4, in_features // 4)
        self.r, self.i, self.j, self.k = (nn.Parameter(torch.empty(shape)) for _ in range(4))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        quaternion_glorot_(self.r, self.i, self.j, self.k)

    def weight(self) -> Tensor:
        return hamilton_matrix(self.r, self.i, self.j, self.k)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight(), self.bias)


class DomainBias(nn.Module):
    """b = Linear(hidden -> W_t)(ReLU(Linear(D_d -> hidden)(f_d)))."""

    def __init__(self, domain_dim: int, text_width: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(domain_dim, hidden), nn.ReLU(), nn.Linear(hidden, text_width))

    def forward(self, f_d: Tensor) -> Tensor:
        return self.net(f_d)


class LowRankAttention(nn.Module):
    """Per-layer low-rank updates: QKV ``B diag(s) A x * scale`` (A, B Xavier-uniform) and a plain LoRA on
    the output projection (A Kaiming-uniform, B zeros)."""

    def __init__(self, width: int, rank: int, qkv_scale: float, out_scale: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, width))
        self.B = nn.Parameter(torch.empty(3 * width, rank))
        self.A_out = nn.Parameter(torch.empty(rank, width))
        self.B_out = nn.Parameter(torch.zeros(width, rank))
        nn.init.xavier_uniform_(self.A)
        nn.init.xavier_uniform_(self.B)
        nn.init.kaiming_uniform_(self.A_out, a=math.sqrt(5))
        self.qkv_scale, self.out_scale = qkv_scale, out_scale

    def qkv_delta(self, x: Tensor, s: Tensor) -> Tensor:
        return ((x @ self.A.T) * s) @ self.B.T * self.qkv_scale

    def out_delta(self, o: Tensor) -> Tensor:
        return (o @ self.A_out.T) @ self.B_out.T * self.out_scale


class CoupledLoRA(nn.Module):
    """Low-rank adaptation of attention layers 0..depth-1 of both encoders with coupled scaling vectors:
    ``S_all`` (depth x r x 2: vision, text) is used as ``S_all R + S_all`` with a learnable 2 x 2 ``R``
    initialised to zeros. ``frozen_coupling`` reproduces the released code, which re-wraps the product as a
    new parameter every forward pass: no gradient reaches ``S`` or ``R``, so they keep their initial values."""

    def __init__(self, text_width: int, vision_width: int, depth: int, rank: int = 4, alpha: float = 1.0,
                 out_scale: float = 0.25, frozen_coupling: bool = False):
        super().__init__()
        qkv_scale = alpha / rank / 4
        self.vision = nn.ModuleList([LowRankAttention(vision_width, rank, qkv_scale, out_scale) for _ in range(depth)])
        self.text = nn.ModuleList([LowRankAttention(text_width, rank, qkv_scale, out_scale) for _ in range(depth)])
        self.S = nn.Parameter(torch.ones(depth, rank, 2))
        self.R = nn.Parameter(torch.zeros(2, 2))
        self.depth = depth
        self.frozen_coupling = frozen_coupling

    def scales(self) -> Tensor:
        """Coupled scaling vectors, depth x r x 2 (column 0 vision, 1 text)."""
        s = self.S @ self.R + self.S
        return s.detach() if self.frozen_coupling else s
