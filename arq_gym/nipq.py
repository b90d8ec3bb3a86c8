"""NIPQ (Shin et al., CVPR 2023): bit-widths learned with pseudo-quantization noise under a BOPs
target, the paper's main baseline. What ``arq-gym nipq`` runs; written from the method's
description (background.md section 6), not from the authors' code.

Phase 1, noise training (:class:`NoiseProxyQuantizer` on the weight and the input activation of
every searched layer):

* bits ``b = 2 + 12 * sigmoid(theta)`` per quantizer, ``theta = 0`` (8 bits) at the start; in
  training ``b`` is stochastically rounded (``round(b + u)``, ``u ~ U(-1/2, 1/2)``) with a
  straight-through gradient, in evaluation ``round(b)``;
* range ``a = softplus(raw)`` learned, initialised at ``max |w|`` for weights and at the
  8-bit MSE calibration for activations (:class:`~arq_gym.quant.QuantizedModel`);
* quantization is replaced by noise: inside the range ``x + e * step`` with
  ``step = a / levels`` (``levels = 2^(b-1) - 1`` signed, ``2^b - 1`` unsigned) and ``e ~
  U(-1/2, 1/2)``, the rounding error's distribution (mean 0, variance ``step^2 / 12``); values
  beyond the range are clipped. Gradients reach ``a`` and ``theta`` through the clip and the step;
* the loss adds ``penalty * smooth_l1(BOPs / target, 1)`` with ``BOPs = sum MACs * b_w * b_a``
  (the project's cost model; the first and last layers pinned at ``keep_first_last`` bits like
  every other row), normalised by the target so the weight does not depend on the model's size;
* every training image carries the base model's Gaussian noise, so batch norm and the learned
  ranges see what certification sees.

Then the learned bits are rounded, clipped into the project's range (2..8: NIPQ's own range
reaches 14) and the project's budget enforcement (:func:`arq_gym.budget.enforce_budget`, HAQ
mode) makes the policy fit, like every other row of a table; the distance of the learned bits
from the budget before enforcement is reported. Phase 2 is NIPQ's short hard-quantization
phase with the bits frozen and batch norm updating: :func:`arq_gym.finetune.finetune` (the same
quantizers as the rest of the package, straight-through) for ``hard_epochs`` epochs, which
writes the quantized checkpoint and ``policy.json`` in the format of ``arq-gym finetune``.

Resume: phase 1 saves ``OUT/nipq_resume.pt`` after every epoch and ``OUT/nipq_phase1.pt`` when
it ends; phase 2 resumes through ``arq-gym finetune``'s own ``resume.pt``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from arq_gym.policy import MAX_BITS, MIN_BITS, Policy

__all__ = ["NIPQConfig", "NIPQNetwork", "NoiseProxyQuantizer", "nipq"]

RESUME_FORMAT = "arq-nipq-state/1"
#: NIPQ's bit parameterisation: b = BITS_LOW + BITS_SPAN * sigmoid(theta)
BITS_LOW, BITS_SPAN = 2.0, 12.0


@dataclass
class NIPQConfig:
    """Hyper-parameters of NIPQ (phase 1) and of its hard-quantization phase."""

    epochs: int = 10  # noise-training epochs (phase 1)
    hard_epochs: int = 3  # hard-quantization epochs with frozen bits (phase 2)
    budget: float = 1 / 64
    penalty: float = 1.0
    batch_size: int = 128
    lr: float = 0.01
    bits_lr: float = 0.1  # theta and ranges (no weight decay)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    keep_first_last: int | None = 8
    seed: int = 0
    bf16: bool = True
    val_images: int = 2000
    calibration_images: int = 512
    train_images: int | None = None
    device: str = "cpu"
    # the noise-training recipe of both phases; None: the base model's own
    # (:func:`arq_gym.finetune.noise_recipe`)
    consistency: float | None = None
    noise_copies: int | None = None
    consistency_eta: float | None = None


def _inverse_softplus(y: float) -> float:
    return float(y + math.log(-math.expm1(-y))) if y < 20 else float(y)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class NoiseProxyQuantizer(nn.Module):
    """A per-tensor quantizer with learned bits and range (phase 1 of NIPQ).

    Training: ``clip(x) + e * step`` with ``e ~ U(-1/2, 1/2)``; evaluation: the hard quantizer
    ``round(clip(x) / step) * step`` (straight-through). ``bits(stochastic)`` gives the bits as a
    tensor carrying the gradient of ``theta``.
    """

    def __init__(self, signed: bool, init_range: float, init_bits: float = 8.0):
        super().__init__()
        self.signed = bool(signed)
        u = (float(init_bits) - BITS_LOW) / BITS_SPAN
        self.theta = nn.Parameter(torch.tensor(math.log(u / (1 - u))))
        self.raw_range = nn.Parameter(torch.tensor(_inverse_softplus(max(init_range, 1e-4))))

    def continuous_bits(self) -> torch.Tensor:
        """``2 + 12 * sigmoid(theta)``, not rounded."""
        return BITS_LOW + BITS_SPAN * torch.sigmoid(self.theta)

    def bits(self, stochastic: bool | None = None) -> torch.Tensor:
        """Rounded bits with a straight-through gradient: stochastic rounding in training
        (``round(b + u)``), ``round(b)`` otherwise."""
        b = self.continuous_bits()
        stochastic = self.training if stochastic is None else stochastic
        if stochastic:
            return b + (torch.round(b + torch.rand(()) - 0.5) - b).detach()
        return _round_ste(b)

    def range(self) -> torch.Tensor:
        """The clipping range ``softplus(raw)``."""
        return F.softplus(self.raw_range)

    def step(self, bits: torch.Tensor) -> torch.Tensor:
        """Quantization step for ``bits``: ``range / levels``."""
        levels = 2 ** (bits - 1) - 1 if self.signed else 2**bits - 1
        return self.range() / levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        a = self.range()
        low = -a if self.signed else torch.zeros_like(a)
        clipped = torch.minimum(torch.maximum(x, low), a)
        step = self.step(self.bits())
        if self.training:
            return clipped + (torch.rand_like(clipped) - 0.5) * step
        return _round_ste(clipped / step) * step


class _WeightNoise(nn.Module):
    """Parametrization: a layer's weight through its :class:`NoiseProxyQuantizer`."""

    def __init__(self, quantizer: NoiseProxyQuantizer):
        super().__init__()
        self.q = [quantizer]  # a list: the quantizer is registered once, in NIPQNetwork

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.q[0](w)


class NIPQNetwork(nn.Module):
    """A float classifier with a :class:`NoiseProxyQuantizer` on the weight and the input of
    every searched layer (pinned layers stay float in phase 1 and are priced at their bits).
    Built from a calibrated :class:`~arq_gym.quant.QuantizedModel`."""

    def __init__(self, qmodel, keep_first_last: int | None = 8):
        super().__init__()
        from arq_gym.budget import pinned_layers
        from arq_gym.cost import fp32_bops

        self.layers = list(qmodel.layers)
        net = copy.deepcopy(qmodel.model)
        for m in net.modules():
            m._forward_pre_hooks.clear()
        modules = dict(net.named_modules())
        targets = [modules[layer.name] for layer in self.layers]
        with torch.no_grad():
            for i, m in enumerate(targets):
                m.weight.copy_(qmodel.fp_weight(i))
        for p in net.parameters():
            p.requires_grad_(True)
        self.net = net
        self.pinned = pinned_layers(len(self.layers), keep_first_last)
        self.wq, self.aq = nn.ModuleDict(), nn.ModuleDict()
        for i, m in enumerate(targets):
            if i in self.pinned:
                continue
            wq = NoiseProxyQuantizer(True, float(m.weight.detach().abs().max()))
            aqm = qmodel.act_quant[i]
            aq = NoiseProxyQuantizer(aqm.signed, aqm.ranges[8])
            self.wq[str(i)], self.aq[str(i)] = wq, aq
            parametrize.register_parametrization(m, "weight", _WeightNoise(wq))
            m.register_forward_pre_hook(lambda mod, args, q=aq: (q(args[0]), *args[1:]))
        self.macs = torch.tensor([float(layer.macs) for layer in self.layers])
        self.fp32_bops = float(fp32_bops(self.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def quantizer_parameters(self) -> list[nn.Parameter]:
        """Bits (theta) and ranges of every quantizer."""
        return [*self.wq.parameters(), *self.aq.parameters()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """The network's own parameters (latent weights, biases, batch norm)."""
        return list(self.net.parameters())

    def bops(self, stochastic: bool | None = None, rounded: bool = True) -> torch.Tensor:
        """BOPs of the current bits (a differentiable tensor): ``sum MACs * b_w * b_a``.
        ``rounded=False`` uses the continuous bits."""
        w_bits, a_bits = [], []
        for i in range(len(self.layers)):
            if i in self.pinned:
                b = torch.tensor(float(self.pinned[i]))
                w_bits.append(b)
                a_bits.append(b)
                continue
            wq, aq = self.wq[str(i)], self.aq[str(i)]
            w_bits.append(wq.bits(stochastic) if rounded else wq.continuous_bits())
            a_bits.append(aq.bits(stochastic) if rounded else aq.continuous_bits())
        return (self.macs * torch.stack(w_bits) * torch.stack(a_bits)).sum()

    def learned_bits(self) -> tuple[list[float], list[float]]:
        """The continuous bits per layer (pinned layers at their bits)."""
        w, a = [], []
        for i in range(len(self.layers)):
            if i in self.pinned:
                w.append(float(self.pinned[i]))
                a.append(float(self.pinned[i]))
            else:
                w.append(float(self.wq[str(i)].continuous_bits().detach()))
                a.append(float(self.aq[str(i)].continuous_bits().detach()))
        return w, a

    def rounded_policy(self) -> Policy:
        """The learned bits rounded, clipped into [2, 8] (before budget enforcement)."""
        w, a = self.learned_bits()
        clip = lambda b: int(min(max(round(b), MIN_BITS), MAX_BITS))  # noqa: E731
        return Policy(tuple(clip(b) for b in w), tuple(clip(b) for b in a))

    def float_model(self, like: nn.Module) -> nn.Module:
        """A copy of ``like`` (the base architecture) with this network's latent float weights,
        biases and batch-norm statistics."""
        latent = ".parametrizations.weight.original"
        state = {(k[: -len(latent)] + ".weight" if k.endswith(latent) else k): v.detach().clone()
                 for k, v in self.net.state_dict().items()}  # fmt: skip
        model = copy.deepcopy(like).cpu()
        model.load_state_dict(state)
        return model.eval()


def nipq(
    model: nn.Module,
    meta: dict,
    out: str | os.PathLike,
    cfg: NIPQConfig | None = None,
    *,
    splits: Any = None,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Run NIPQ on ``model`` (a base checkpoint with ``meta``) into the folder ``out``.

    Writes ``nipq.json`` (phase-1 history, learned bits, BOPs before and after enforcement),
    then phase 2's outputs (``model.pt``, ``policy.json``, ``finetune.json``; see
    :func:`arq_gym.finetune.finetune`) and ``tb/``. Returns the summary.
    """
    from arq_gym import data as data_mod
    from arq_gym.budget import check_feasible, enforce_budget, parse_budget
    from arq_gym.cost import bops_fraction
    from arq_gym.files import atomic_write_text, dumps
    from arq_gym.finetune import (
        FinetuneConfig,
        NoisyBatches,
        check_config,
        config_identity,
        cosine_schedule,
        finetune,
        noise_recipe,
        noisy_accuracy,
        train_epoch,
    )
    from arq_gym.quant import QuantizedModel, calibration_images

    cfg = cfg or NIPQConfig()
    check_config(cfg)
    recipe = noise_recipe(cfg, meta)
    if cfg.hard_epochs < 1:
        raise ValueError(f"hard_epochs must be >= 1, got {cfg.hard_epochs!r}")
    if not cfg.penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {cfg.penalty!r}")
    budget = parse_budget(cfg.budget)
    sigma, dataset = float(meta["sigma"]), meta["dataset"]
    out = Path(out)
    resume_path, phase1_path = out / "nipq_resume.pt", out / "nipq_phase1.pt"
    if not resume and any((out / f).exists() for f in ("nipq_resume.pt", "nipq_phase1.pt",
                                                          "model.pt", "resume.pt")):  # fmt: skip
        raise FileExistsError(f"{out} holds a NIPQ run; pass --resume or another --out")
    if resume and not (resume_path.exists() or phase1_path.exists()):
        raise FileNotFoundError(f"--resume given but {out} holds no NIPQ run")
    splits = splits if splits is not None else data_mod.load(dataset, data_dir)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    calib = calibration_images(splits.train, cfg.calibration_images, seed=0)
    qmodel = QuantizedModel(model.cpu(), calib, sigma, seed=0)
    layers = qmodel.layers
    net = NIPQNetwork(qmodel, cfg.keep_first_last).to(device)
    del qmodel
    check_feasible(layers, budget, (MIN_BITS, MAX_BITS), cfg.keep_first_last)
    target_bops = budget * net.fp32_bops
    identity = {"config": config_identity(cfg), "parent": meta.get("sha256")}
    if recipe["consistency"] > 0:  # plain runs keep the identity they had before recipes
        identity["recipe"] = recipe

    if phase1_path.exists():
        phase1 = torch.load(phase1_path, map_location=device, weights_only=False)
        if phase1["identity"] != identity:
            raise ValueError(f"{phase1_path} was made with other settings")
        net.load_state_dict(phase1["model"])
        state = phase1["state"]
    else:
        train_split = splits.train
        if cfg.train_images is not None:
            k = min(cfg.train_images, len(train_split))
            train_split = train_split.subset(np.linspace(0, len(train_split) - 1, k).round()
                                             .astype(int))  # fmt: skip
        val_n = min(cfg.val_images, len(splits.val))
        val_x, val_y = splits.val.x[:val_n], splits.val.y[:val_n]
        gen = torch.Generator().manual_seed(cfg.seed)
        batches = NoisyBatches(train_split, sigma, cfg.batch_size, gen,
                               crop=dataset == "cifar10", bf16=cfg.bf16, device=device,
                               copies=recipe["noise_copies"])  # fmt: skip
        opt = torch.optim.SGD(
            [{"params": net.weight_parameters(), "weight_decay": cfg.weight_decay,
              "lr": cfg.lr},
             {"params": net.quantizer_parameters(), "weight_decay": 0.0, "lr": cfg.bits_lr}],
            lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
        )  # fmt: skip
        sched = cosine_schedule(opt, cfg.epochs * len(batches))
        state = {"epoch": 0, "history": [], "seconds": 0.0}
        if resume and resume_path.exists():
            saved = torch.load(resume_path, map_location=device, weights_only=False)
            if saved.get("format") != RESUME_FORMAT or saved["identity"] != identity:
                raise ValueError(f"{resume_path} was made with other settings")
            net.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            gen.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])  # the noise proxy and stochastic rounding
            state = saved["state"]
        out.mkdir(parents=True, exist_ok=True)
        writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb" / "nipq"))

        def penalty():
            ratio = net.bops() / target_bops
            term = cfg.penalty * F.smooth_l1_loss(ratio, torch.ones_like(ratio))
            return term, {"bops_fraction": float(ratio.detach()) * budget}

        t_run = time.perf_counter() - state["seconds"]
        for epoch in range(state["epoch"], cfg.epochs):
            stats = train_epoch(net, opt, sched, batches, f"nipq epoch {epoch + 1}/{cfg.epochs}",
                                progress, penalty=penalty, consistency=recipe["consistency"],
                                consistency_eta=recipe["consistency_eta"])  # fmt: skip
            net.eval()
            w, a = net.learned_bits()
            searched = [i for i in range(len(layers)) if i not in net.pinned]
            rec = {"epoch": epoch + 1, **stats,
                   "val_noisy_acc": noisy_accuracy(net, val_x, val_y, sigma),
                   "rounded_bops_fraction": float(net.bops(stochastic=False).detach()) / net.fp32_bops,
                   "mean_w_bits": float(np.mean([w[i] for i in searched])),
                   "mean_a_bits": float(np.mean([a[i] for i in searched])),
                   "seconds": time.perf_counter() - t_run}  # fmt: skip
            state["history"].append(rec)
            state["epoch"], state["seconds"] = epoch + 1, rec["seconds"]
            if progress:
                print(f"nipq epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.4f}, BOPs "
                      f"{rec['rounded_bops_fraction']:.4%} (target {budget:.4%}), mean bits "
                      f"W{rec['mean_w_bits']:.2f} A{rec['mean_a_bits']:.2f}, val (noisy) "
                      f"{rec['val_noisy_acc']:.4f} [{rec['seconds']:.0f} s]", flush=True)  # fmt: skip
            if writer is not None:
                for k in ("loss", "train_noisy_acc", "val_noisy_acc", "bops_fraction",
                          "rounded_bops_fraction", "mean_w_bits", "mean_a_bits"):  # fmt: skip
                    writer.add_scalar(f"nipq/{k}", rec[k], epoch + 1)
                writer.flush()
            blob = {"format": RESUME_FORMAT, "identity": identity, "model": net.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "state": state}  # fmt: skip
            tmp = resume_path.with_name(resume_path.name + ".tmp")
            torch.save(blob, tmp)
            os.replace(tmp, resume_path)
        if writer is not None:
            writer.close()
        tmp = phase1_path.with_name(phase1_path.name + ".tmp")
        torch.save({"identity": identity, "model": net.state_dict(), "state": state}, tmp)
        os.replace(tmp, phase1_path)
        resume_path.unlink(missing_ok=True)

    net.eval()
    learned_w, learned_a = net.learned_bits()
    rounded = net.rounded_policy()
    enforced = enforce_budget(rounded, layers, budget, "haq", (MIN_BITS, MAX_BITS),
                              cfg.keep_first_last)  # fmt: skip
    summary = {
        "method": "nipq",
        "budget": budget,
        "learned_w_bits": learned_w,
        "learned_a_bits": learned_a,
        "rounded_policy": rounded.to_dict(),
        "rounded_bops_fraction": bops_fraction(layers, rounded),
        "policy": enforced.to_dict(),
        "bops_fraction": bops_fraction(layers, enforced),
        "noise_epochs": cfg.epochs,
        "hard_epochs": cfg.hard_epochs,
        "noise_seconds": state["seconds"],
        "history": state["history"],
        "config": asdict(cfg),
        "recipe": recipe,
    }
    atomic_write_text(out / "nipq.json", dumps(summary))
    ft_cfg = FinetuneConfig(epochs=cfg.hard_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                            bf16=cfg.bf16, val_images=cfg.val_images,
                            calibration_images=cfg.calibration_images,
                            train_images=cfg.train_images, device=cfg.device,
                            **recipe)  # fmt: skip
    hard = finetune(net.float_model(model), dict(meta), enforced, out, ft_cfg, splits=splits,
                    resume=(out / "resume.pt").exists() or (out / "model.pt").exists(),
                    progress=progress, tensorboard=tensorboard,
                    policy_source="nipq")  # fmt: skip
    summary["hard"] = {k: v for k, v in hard.items() if k not in ("history", "config")}
    summary["checkpoint_sha256"] = hard["checkpoint_sha256"]
    summary["seconds"] = state["seconds"] + hard["seconds"]
    atomic_write_text(out / "nipq.json", dumps(summary))
    return summary
