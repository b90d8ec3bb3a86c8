"""Calibration of the activation ranges on noisy training images: the ``max``, ``percentile``
and ``mse`` rules (see :mod:`arq_gym.quant` for the measurements behind the default)."""

from __future__ import annotations

import math

import torch

from arq_gym.quant.reference import activation_qrange

__all__ = ["CALIBRATION_RULES", "DEFAULT_CALIBRATION", "calibration_images"]

CALIBRATION_RULES = ("max", "percentile", "mse")
DEFAULT_CALIBRATION = "mse"
#: values kept per layer for the MSE search
MSE_SAMPLE = 1 << 13
MSE_GRID = 32


class _Stats:
    """Running statistics of one layer's input over the calibration batch."""

    def __init__(self, total: int, percentile: float, sample: int, gen: torch.Generator):
        self.min = math.inf
        self.absmax = 0.0
        # exact upper percentile: keep the k largest |x| seen so far
        self.k = max(1, math.ceil(total * (1.0 - percentile / 100.0)) + 1)
        self.top: torch.Tensor | None = None
        self.total = total
        self.sample_size = sample
        self.samples: list[torch.Tensor] = []
        self.gen = gen

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.min = min(self.min, float(x.min()))
        a = x.abs()
        self.absmax = max(self.absmax, float(a.max()))
        cand = a if self.top is None else torch.cat([self.top, a])
        self.top = torch.topk(cand, min(self.k, cand.numel()), sorted=False).values
        # a share of the MSE sample proportional to this batch's share of the data
        want = math.ceil(self.sample_size * x.numel() / self.total)
        idx = torch.randint(x.numel(), (min(want, x.numel()),), generator=self.gen)
        self.samples.append(x.cpu()[idx])

    def percentile_value(self) -> float:
        return float(self.top.min()) if self.top is not None else 0.0


def _mse_range(sample: torch.Tensor, absmax: float, bits: int, signed: bool) -> float:
    """Clipping range in (0, absmax] minimising the fake-quantization MSE of ``sample``.

    Coarse grid of ``MSE_GRID`` ratios of ``absmax``, then the same number of points between
    the best ratio's neighbours. Zeros are left out: they are represented exactly at any range.
    """
    x = sample[sample != 0]
    if absmax <= 0 or x.numel() == 0:
        return max(absmax, 1e-8)
    qmin, qmax = activation_qrange(bits, signed)
    zero = torch.zeros(MSE_GRID, dtype=torch.int32)
    xs = x.unsqueeze(0).expand(MSE_GRID, -1).contiguous()

    def best(ratios: torch.Tensor) -> float:
        r = (ratios * absmax).float()
        q = torch.fake_quantize_per_channel_affine(xs, r / qmax, zero, 0, qmin, qmax)
        return float(ratios[int(torch.argmin((q - xs).pow_(2).mean(dim=1)))])

    step = 1.0 / MSE_GRID
    coarse = best(torch.linspace(step, 1.0, MSE_GRID, dtype=torch.float64))
    fine = best(
        torch.linspace(max(coarse - step, step / MSE_GRID), min(coarse + step, 1.0), MSE_GRID,
                       dtype=torch.float64)
    )  # fmt: skip
    return fine * absmax


def calibration_images(split, count: int = 512, seed: int = 0) -> torch.Tensor:
    """``count`` images of a data split (``arq_gym.data.Split``) drawn with a fixed seed, as
    float in [0, 1]; pass them to :class:`QuantizedModel` (take them from the train split)."""
    n = len(split.y)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(count, n)].sort().values
    x = torch.as_tensor(split.x[idx.numpy()])
    return x.float() / 255.0
