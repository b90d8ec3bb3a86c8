"""Quantization-aware fine-tuning of the network a mixed-precision policy defines.

What ``arq-gym finetune`` runs. The policy fixes every layer's weight and input-activation
bit-widths; training then adapts the network to them:

* Weights keep a float latent copy; the forward pass uses its fake-quantized value, exactly the
  quantizer the rest of the package certifies (symmetric, per output channel, scale
  ``max|w| / (2^(b-1)-1)``, :func:`arq_gym.quant.quantize_weight`), and the gradient passes
  straight through (``torch.fake_quantize_per_channel_affine`` and a
  :func:`torch.nn.utils.parametrize.register_parametrization` on each layer's weight).
* Activations: the input of every quantized layer goes through a quantizer whose clipping
  range is learned (LSQ, Esser et al. 2020: ``y = s * round(clamp(x / s, qmin, qmax))`` with
  ``s = range / qmax``, a straight-through estimator for the rounding and LSQ's gradient scale
  ``1 / sqrt(elements * qmax)``), initialised from the MSE calibration of
  :class:`~arq_gym.quant.QuantizedModel`. Signed or unsigned as calibrated.
* Every training image gets the base model's Gaussian noise (after crop and flip), since the
  smoothed classifier is what gets certified; batch norm trains, so its statistics are those
  of noisy inputs. SGD with momentum and a cosine learning rate to 0.
* Model selection on the held-out validation images (never the test split): after each epoch
  the network in evaluation mode is scored on ``val_images`` validation images with a fixed
  draw of the noise, and the best epoch is kept.

The result is a *quantized checkpoint*: an ordinary checkpoint file
(:func:`arq_gym.models.save_checkpoint`) whose state dict holds the fine-tuned float latent
weights and batch-norm statistics, and whose metadata has a ``quantization`` record (the
policy's ``w_bits``/``a_bits``, the learned activation ranges, their signedness) and the
provenance (``parent_sha256``, the fine-tuning configuration and history).
:class:`~arq_gym.quant.QuantizedModel` applies the record (``quantization=``), so
``arq-gym certify --checkpoint``, the environments' ``checkpoint=`` and the int8 execution path
run the fine-tuned network: weights quantized by the same rule from the saved latent weights,
activations clipped at the learned ranges.

Resume: after every epoch the whole state (model, optimiser, schedule, generator, best state,
history) is written atomically to ``OUT/resume.pt``; ``resume=True`` continues after the last
finished epoch, so a run killed at any point repeats at most the epoch in progress.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from arq_gym.policy import FLOAT_BITS, Policy

__all__ = [
    "QUANTIZATION_FORMAT",
    "FinetuneConfig",
    "LearnedActivationQuantizer",
    "QATNetwork",
    "WeightFakeQuant",
    "finetune",
    "noise_recipe",
]

QUANTIZATION_FORMAT = "arq-quantization/1"
RESUME_FORMAT = "arq-finetune-state/1"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of quantization-aware fine-tuning (defaults measured on ResNet-20)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    distill: float = 0.0  # weight of knowledge distillation from the FP32 network (0: plain CE)
    # the noise-training recipe; None: the base model's own (its ``arq-gym train`` config)
    consistency: float | None = None  # lambda of the consistency regulariser (0: plain noise)
    noise_copies: int | None = None  # m: noisy copies of every image when consistency > 0
    consistency_eta: float | None = None  # weight of the entropy of the copies' mean prediction
    bf16: bool = True  # bf16 autocast for the convolutions on the CPU; quantizers stay fp32
    val_images: int = 2000
    calibration_images: int = 512
    train_images: int | None = None  # only K evenly spaced training images (quick runs)
    device: str = "cpu"


class WeightFakeQuant(nn.Module):
    """Parametrization of a weight: its per-output-channel symmetric fake quantization.

    The scale is ``max|w| / (2^(b-1)-1)`` per output channel, computed from the detached
    weight; ``torch.fake_quantize_per_channel_affine`` passes the gradient straight through to
    the latent float weight. In evaluation this is :func:`arq_gym.quant.quantize_weight`.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.qmax = 2 ** (self.bits - 1) - 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).float().clamp_min(1e-12)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, amax / self.qmax, zero, 0,
                                                      -self.qmax, self.qmax)  # fmt: skip


class LearnedActivationQuantizer(nn.Module):
    """Per-tensor fake quantizer with a learned clipping range (LSQ-style gradients).

    ``forward(x) = s * round(clamp(x * (1/s), qmin, qmax))``, ``s = range / qmax``; the rounding
    passes gradients straight through, the clamp stops them outside the range, and the range
    gets LSQ's gradient (scaled by ``1 / sqrt(elements per image * qmax)``, set on the first
    call). Runs in float32 even under autocast.
    """

    def __init__(self, bits: int, signed: bool, init_range: float):
        super().__init__()
        from arq_gym.quant import activation_qrange

        self.bits = int(bits)
        self.signed = bool(signed)
        self.qmin, self.qmax = activation_qrange(self.bits, self.signed)
        self.range = nn.Parameter(torch.tensor(float(max(init_range, 1e-6))))
        self.grad_scale: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.grad_scale is None:
            self.grad_scale = 1.0 / math.sqrt(max(x[0].numel(), 1) * self.qmax)
        g = self.grad_scale
        r = self.range.abs().clamp_min(1e-6)
        r = (r - r * g).detach() + r * g  # value r, gradient scaled by g
        scale = r / self.qmax
        v = torch.clamp(x * (1.0 / scale), self.qmin, self.qmax)
        v = v + (torch.round(v) - v).detach()
        return v * scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, range={float(self.range):.4g}"


class QATNetwork(nn.Module):
    """A copy of a float classifier quantized for training to one policy.

    Built from a calibrated :class:`~arq_gym.quant.QuantizedModel` (its float weights, layer
    list, activation signedness and MSE-calibrated ranges). Layers at 32 bits stay float.
    :meth:`quantization_record` and :meth:`float_state_dict` are what a quantized checkpoint
    stores.
    """

    def __init__(self, qmodel, policy: Policy):
        super().__init__()
        policy.check(qmodel.layers)
        self.policy = policy
        self.layers = list(qmodel.layers)
        net = copy.deepcopy(qmodel.model)
        # QuantizedModel's hooks and quantized weights are not part of the float network
        for m in net.modules():
            m._forward_pre_hooks.clear()
        modules = dict(net.named_modules())
        self.targets = [modules[layer.name] for layer in self.layers]
        with torch.no_grad():
            for i, m in enumerate(self.targets):
                m.weight.copy_(qmodel.fp_weight(i))
        for p in net.parameters():
            p.requires_grad_(True)
        self.net = net
        self.act = nn.ModuleDict()
        for i, (m, wb, ab) in enumerate(zip(self.targets, policy.w_bits, policy.a_bits)):
            if wb != FLOAT_BITS:
                parametrize.register_parametrization(m, "weight", WeightFakeQuant(wb))
            if ab != FLOAT_BITS:
                aq = qmodel.act_quant[i]
                q = LearnedActivationQuantizer(ab, aq.signed, aq.ranges[ab])
                self.act[str(i)] = q
                m.register_forward_pre_hook(lambda mod, args, q=q: (q(args[0]), *args[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def range_parameters(self) -> list[nn.Parameter]:
        """The learned activation ranges."""
        return [q.range for q in self.act.values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter (latent weights, biases, batch norm)."""
        ranges = {id(p) for p in self.range_parameters()}
        return [p for p in self.net.parameters() if id(p) not in ranges]

    def quantization_record(self) -> dict[str, Any]:
        """The ``quantization`` metadata of a quantized checkpoint."""
        ranges, signed = [], []
        acts = dict(self.act.items())
        for i in range(len(self.layers)):
            q = acts.get(str(i))
            ranges.append(None if q is None else float(q.range.detach().abs()))
            signed.append(None if q is None else q.signed)
        return {
            "format": QUANTIZATION_FORMAT,
            "w_bits": list(self.policy.w_bits),
            "a_bits": list(self.policy.a_bits),
            "act_ranges": ranges,
            "act_signed": signed,
            "per_channel": True,
            "layers": [layer.name for layer in self.layers],
        }

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the underlying float network with the latent (unquantized) weights,
        under the base model's own parameter names."""
        # (copying a parametrized module and removing the copy's parametrization would change
        # the class both share, so the names are mapped instead)
        latent = ".parametrizations.weight.original"
        return {
            (k[: -len(latent)] + ".weight" if k.endswith(latent) else k): v.detach().cpu().clone()
            for k, v in self.net.state_dict().items()
        }


@torch.no_grad()
def noisy_accuracy(model: nn.Module, x_u8: np.ndarray, y: np.ndarray, sigma: float,
                   seed: int = 0, batch: int = 500) -> float:  # fmt: skip
    """Top-1 accuracy on ``x + N(0, sigma^2)`` with a fixed noise draw (model in eval mode)."""
    from arq_gym.train import evaluate

    return evaluate(model, x_u8, y, sigma, seed=seed, batch=batch)


RECIPE_FIELDS = ("consistency", "noise_copies", "consistency_eta")
# the recipe of runs written before it was recorded: plain Gaussian noise augmentation
PLAIN_RECIPE = {"consistency": 0.0, "noise_copies": 1, "consistency_eta": 0.5}


def noise_recipe(cfg: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The noise-training recipe that fine-tuning (or NIPQ) of the base model ``meta`` follows.

    Each of ``cfg``'s :data:`RECIPE_FIELDS` that is set wins; one left at None takes the base
    model's value from its training configuration (``meta["config"]``, as ``arq-gym train``
    records it), and plain Gaussian augmentation for a model that records none. Fine-tuning a
    model trained with the consistency regulariser without it undoes what the regulariser
    bought (at sigma 1.0 the ACR of the fine-tuned W8A8 network fell by a sixth).
    Returns ``{"consistency": lambda, "noise_copies": m, "consistency_eta": eta}``, with
    ``noise_copies`` 1 when lambda is 0.
    """
    base = meta.get("config") or {}
    defaults = {"consistency": 0.0, "noise_copies": 2, "consistency_eta": 0.5}
    recipe = {}
    for name, default in defaults.items():
        value = getattr(cfg, name, None)
        if value is None:
            value = base.get(name)
        recipe[name] = default if value is None else value
    lam, m, eta = float(recipe["consistency"]), int(recipe["noise_copies"]), float(recipe["consistency_eta"])
    if not (math.isfinite(lam) and lam >= 0 and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"consistency and its eta must be >= 0, got {lam!r} and {eta!r}")
    if lam > 0 and m < 2:
        raise ValueError(f"the consistency regulariser compares noisy copies: noise_copies >= 2, got {m}")
    if lam > 0 and getattr(cfg, "distill", 0.0) > 0:
        raise ValueError("distillation and the consistency regulariser do not combine: pass "
                         "--consistency 0 with --distill")  # fmt: skip
    return {"consistency": lam, "noise_copies": m if lam > 0 else 1, "consistency_eta": eta}


def config_identity(cfg: Any) -> dict[str, Any]:
    """``asdict(cfg)`` without the recipe fields left at None, so that a run written before they
    existed resumes under the same settings."""
    return {k: v for k, v in asdict(cfg).items() if not (k in RECIPE_FIELDS and v is None)}


class NoisyBatches:
    """Shuffled training batches with crop/flip augmentation (CIFAR) and the certification
    noise, as ``arq-gym train`` makes them; one pass over the split per :meth:`epoch`. With
    ``copies`` m > 1 every batch holds m noisy copies of the same augmented images, stacked
    (``m * B`` images, the B labels once), for the consistency regulariser."""

    def __init__(self, split: Any, sigma: float, batch_size: int, gen: torch.Generator,
                 crop: bool, bf16: bool = True, device: torch.device | str = "cpu",
                 copies: int = 1):  # fmt: skip
        self.x = torch.from_numpy(split.x)
        self.y = torch.from_numpy(split.y)
        self.sigma, self.batch_size, self.gen, self.crop = float(sigma), batch_size, gen, crop
        self.copies = int(copies)
        self.device = torch.device(device)
        self.bf16 = bool(bf16) and self.device.type == "cpu"

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def epoch(self):
        """Yield ``(noisy images, labels)`` batches of one shuffled pass."""
        from arq_gym.train import _augment

        perm = torch.randperm(len(self.y), generator=self.gen)
        for step in range(len(self)):
            idx = perm[step * self.batch_size : (step + 1) * self.batch_size]
            x = _augment(self.x[idx].float().div_(255), self.gen, self.crop)
            if self.copies > 1:  # the same augmented images, independent noise per copy
                x = x.repeat(self.copies, 1, 1, 1)
            x = x + self.sigma * torch.randn(x.shape, generator=self.gen)
            yield x.to(self.device), self.y[idx].long().to(self.device)


def train_epoch(net: nn.Module, opt: torch.optim.Optimizer, sched: Any, batches: NoisyBatches,
                desc: str, progress: bool = True, penalty: Any = None,
                teacher: nn.Module | None = None, distill: float = 0.0,
                consistency: float = 0.0, consistency_eta: float = 0.5) -> dict[str, float]:  # fmt: skip
    """One epoch of cross-entropy training on noisy batches (bf16 autocast on the CPU unless
    disabled). ``penalty()``, when given, is added to the loss of every step and returns
    ``(loss term, dict of floats to average and report)``. With a ``teacher`` and ``distill``
    in (0, 1] the loss is ``(1 - distill) * CE + distill * KL(teacher || student)`` on the same
    noisy batch (knowledge distillation from the FP32 network, whose smoothed classifier is the
    one to match). Returns the epoch's means (``loss``, ``train_noisy_acc`` and the penalty's
    figures). Batches of ``m > 1`` noisy copies (:class:`NoisyBatches` ``copies``) are trained
    with :func:`arq_gym.train.consistency_loss` at ``consistency`` and ``consistency_eta``."""
    from arq_gym.train import consistency_loss

    net.train()
    total_loss, correct, seen = 0.0, 0, 0
    extra: dict[str, float] = {}
    bar = tqdm(batches.epoch(), total=len(batches), desc=desc, disable=not progress, leave=False)
    for step, (x, y) in enumerate(bar):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=batches.bf16):
            logits = net(x)
            if batches.copies > 1:
                logits = logits.float().reshape(batches.copies, len(y), -1)
                loss = consistency_loss(logits, y, consistency, consistency_eta)
                logits = logits[0]
            else:
                loss = F.cross_entropy(logits.float(), y)
            if teacher is not None and distill > 0:
                with torch.no_grad():
                    target = F.softmax(teacher(x).float(), dim=1)
                kd = F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean")
                loss = (1 - distill) * loss + distill * kd
        if penalty is not None:
            term, figures = penalty()
            loss = loss + term
            for k, v in figures.items():
                extra[k] = extra.get(k, 0.0) + float(v) * len(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": total_loss / seen, "train_noisy_acc": correct / seen,
            **{k: v / seen for k, v in extra.items()}}  # fmt: skip


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int) -> Any:
    """Learning rate from its initial value to 0 along a half cosine over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(total_steps, 1), 1.0)))
    )


def check_config(cfg: Any) -> None:
    """One-line ValueError unless the training settings of ``cfg`` (a :class:`FinetuneConfig`
    or :class:`~arq_gym.nipq.NIPQConfig`) are usable."""
    for name in ("epochs", "batch_size", "val_images", "calibration_images"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a positive number, got {cfg.lr!r}")
    if cfg.train_images is not None and cfg.train_images < 1:
        raise ValueError(f"train_images must be >= 1, got {cfg.train_images!r}")
    if not 0.0 <= getattr(cfg, "distill", 0.0) <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {cfg.distill!r}")


def finetune(
    model: nn.Module,
    meta: Mapping[str, Any],
    policy: Policy,
    out: str | os.PathLike,
    cfg: FinetuneConfig | None = None,
    *,
    splits: Any = None,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
    policy_source: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (a base checkpoint with ``meta``) quantized to ``policy``.

    Writes into the folder ``out``: ``model.pt`` (the quantized checkpoint), ``policy.json``
    (``arq-policy/1`` with the fine-tuning metrics), ``finetune.json`` (configuration, history,
    timings), ``tb/`` (TensorBoard scalars) and ``resume.pt`` while running. Returns the summary
    written to ``finetune.json``. Raises ValueError (one line) for bad input and
    FileExistsError if ``out`` holds a run and ``resume`` is false.
    """
    from arq_gym import data as data_mod
    from arq_gym.cost import bops_fraction
    from arq_gym.files import atomic_write_text, dumps
    from arq_gym.models.checkpoint import save_checkpoint
    from arq_gym.policy import save_policy
    from arq_gym.quant import QuantizedModel, calibration_images

    cfg = cfg or FinetuneConfig()
    check_config(cfg)
    if meta.get("quantization"):
        raise ValueError("the checkpoint is already a quantized checkpoint; fine-tune its base "
                         f"model (parent sha256 {str(meta.get('parent_sha256'))[:16]}...)")  # fmt: skip
    recipe = noise_recipe(cfg, meta)
    sigma = float(meta["sigma"])
    dataset = meta["dataset"]
    out = Path(out)
    resume_path = out / "resume.pt"
    final_path = out / "model.pt"
    if not resume and (resume_path.exists() or final_path.exists()):
        raise FileExistsError(f"{out} holds a fine-tuning run; pass --resume or another --out")
    if resume and final_path.exists() and not resume_path.exists():
        doc = out / "finetune.json"
        if doc.is_file():
            import json

            done = json.loads(doc.read_text())
            # runs written before the recipe was recorded trained with plain Gaussian noise
            theirs = done.get("recipe", PLAIN_RECIPE)
            if theirs != recipe:
                raise ValueError(f"{out} was fine-tuned with the noise recipe {theirs}, not "
                                 f"{recipe}: fine-tune again into another --out")  # fmt: skip
            parent = done.get("parent_sha256")
            if parent is not None and parent != meta.get("sha256"):
                raise ValueError(f"{out} was fine-tuned from the base model {parent[:16]}..., not "
                                 f"{str(meta.get('sha256'))[:16]}...: fine-tune again into "
                                 "another --out")  # fmt: skip
            if "policy" in done and done["policy"] != policy.to_dict():
                raise ValueError(f"{out} holds the fine-tuning of another policy: fine-tune "
                                 "again into another --out")  # fmt: skip
            return done
    if resume and not resume_path.exists():
        raise FileNotFoundError(f"--resume given but {resume_path} does not exist")
    splits = splits if splits is not None else data_mod.load(dataset, data_dir)

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    calib = calibration_images(splits.train, cfg.calibration_images, seed=0)
    qmodel = QuantizedModel(model.cpu(), calib, sigma, seed=0)
    net = QATNetwork(qmodel, policy).to(device)
    teacher = copy.deepcopy(model).to(device).eval() if cfg.distill > 0 else None
    layers = qmodel.layers
    del qmodel

    train_split = splits.train
    if cfg.train_images is not None:
        k = min(cfg.train_images, len(train_split))
        train_split = train_split.subset(np.linspace(0, len(train_split) - 1, k).round().astype(int))
    val_n = min(cfg.val_images, len(splits.val))
    val_x, val_y = splits.val.x[:val_n], splits.val.y[:val_n]
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = NoisyBatches(train_split, sigma, cfg.batch_size, gen, crop=dataset == "cifar10",
                           bf16=cfg.bf16, device=device,
                           copies=recipe["noise_copies"])  # fmt: skip
    steps = len(batches)
    opt = torch.optim.SGD(
        [{"params": net.weight_parameters(), "weight_decay": cfg.weight_decay},
         {"params": net.range_parameters(), "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum,
    )  # fmt: skip
    sched = cosine_schedule(opt, cfg.epochs * steps)
    net.eval()
    start_val = noisy_accuracy(net, val_x, val_y, sigma)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val": start_val, "best_epoch": 0,
                             "best_state": copy.deepcopy(net.state_dict()), "seconds": 0.0,
                             "start_val": start_val}  # fmt: skip
    if resume:
        saved = torch.load(resume_path, map_location=device, weights_only=False)
        if saved.get("format") != RESUME_FORMAT:
            raise ValueError(f"{resume_path} is not a fine-tuning resume file")
        mine = {"config": asdict(cfg), "policy": policy.to_dict(), "parent": meta.get("sha256"),
                "recipe": recipe}  # fmt: skip
        # settings added since the file was written take their defaults
        theirs = {k: saved.get(k) for k in mine} | {
            "config": {**asdict(FinetuneConfig()), **saved["config"]},
            "recipe": saved.get("recipe", PLAIN_RECIPE)}  # fmt: skip
        if mine != theirs:
            raise ValueError(f"{resume_path} was made with other settings: {theirs}")
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["generator"])
        state = saved["state"]
    out.mkdir(parents=True, exist_ok=True)

    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    t_run = time.perf_counter() - state["seconds"]
    epochs = range(state["epoch"], cfg.epochs)
    for epoch in epochs:
        stats = train_epoch(net, opt, sched, batches, desc=f"finetune epoch {epoch + 1}/"
                            f"{cfg.epochs}", progress=progress, teacher=teacher,
                            distill=cfg.distill, consistency=recipe["consistency"],
                            consistency_eta=recipe["consistency_eta"])  # fmt: skip
        net.eval()
        val = noisy_accuracy(net, val_x, val_y, sigma)
        rec = {"epoch": epoch + 1, **stats, "val_noisy_acc": val, "lr": sched.get_last_lr()[0],
               "seconds": time.perf_counter() - t_run}  # fmt: skip
        state["history"].append(rec)
        if val > state["best_val"]:
            state.update(best_val=val, best_epoch=epoch + 1,
                         best_state=copy.deepcopy(net.state_dict()))  # fmt: skip
        state["epoch"] = epoch + 1
        state["seconds"] = rec["seconds"]
        if progress:
            print(f"finetune epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.4f}, train "
                  f"(noisy) {rec['train_noisy_acc']:.4f}, val (noisy) {val:.4f} "
                  f"[{rec['seconds']:.0f} s]", flush=True)  # fmt: skip
        if writer is not None:
            for k in ("loss", "train_noisy_acc", "val_noisy_acc", "lr"):
                writer.add_scalar(f"finetune/{k}", rec[k], epoch + 1)
            for i, q in net.act.items():
                writer.add_scalar(f"ranges/layer{int(i):02d}", float(q.range.detach().abs()),
                                  epoch + 1)  # fmt: skip
            writer.flush()
        blob = {"format": RESUME_FORMAT, "config": asdict(cfg), "policy": policy.to_dict(),
                "parent": meta.get("sha256"), "recipe": recipe, "model": net.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "state": state}  # fmt: skip
        tmp = resume_path.with_name(resume_path.name + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, resume_path)
    if writer is not None:
        writer.close()

    net.load_state_dict(state["best_state"])
    net.eval()
    record = net.quantization_record()
    summary = {
        "policy": policy.to_dict(),
        "policy_source": policy_source,
        "bops_fraction": bops_fraction(layers, policy),
        "epochs": cfg.epochs,
        "best_epoch": state["best_epoch"],
        "val_images": val_n,
        "val_noisy_acc_before": state["start_val"],
        "val_noisy_acc": state["best_val"],
        "seconds": state["seconds"],
        "seconds_per_epoch": state["seconds"] / max(len(state["history"]), 1),
        "config": asdict(cfg),
        "recipe": recipe,
        "history": state["history"],
    }
    ckpt_meta = {
        "architecture": meta["architecture"],
        "dataset": dataset,
        "dataset_sha256": meta.get("dataset_sha256", getattr(splits, "sha256", None)),
        "sigma": sigma,
        "epochs": meta.get("epochs"),
        "parent_sha256": meta.get("sha256"),
        "quantization": record,
        "finetune": {k: v for k, v in summary.items() if k != "history"},
    }
    target = copy.deepcopy(model).cpu()
    target.load_state_dict(net.float_state_dict())
    sha = save_checkpoint(target, ckpt_meta, final_path)
    summary["checkpoint"] = "model.pt"
    summary["checkpoint_sha256"] = sha
    summary["parent_sha256"] = meta.get("sha256")
    save_policy(out / "policy.json", policy, layers, model=meta["architecture"], dataset=dataset,
                sigma=sigma, metrics={"finetuned": True, "val_noisy_acc": state["best_val"],
                                      "checkpoint_sha256": sha})  # fmt: skip
    atomic_write_text(out / "finetune.json", dumps(summary) + "\n")
    resume_path.unlink(missing_ok=True)
    return summary
