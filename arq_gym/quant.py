"""Mixed-precision fake quantization of any PyTorch classifier.

Layer discovery
    :func:`find_layers` traces one sample input through a model with forward hooks and lists
    every ``nn.Conv2d`` (grouped and depthwise included) and ``nn.Linear`` that the forward pass
    calls, in call order, with shapes, stride, kernel, groups, input feature-map size and MACs
    per input (conv: ``kh*kw*(c_in/groups)*c_out*h_out*w_out``; linear: ``in*out`` per position).

Quantizers (:class:`QuantizedModel`)
    * Weights: symmetric, narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]``, scale ``max|w| / (2^(b-1)-1)``
      per output channel (default) or per tensor, through
      ``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``.
      Biases stay in float (in integer inference they are int32 at scale ``s_w * s_a``).
    * Input activation of every quantizable layer: per-tensor fake quantization with a calibrated
      clipping range ``r``; unsigned ``[0, 2^b-1]`` with scale ``r/(2^b-1)`` where the input was
      never negative on the calibration batch (after a ReLU), signed symmetric
      ``[-(2^(b-1)-1), 2^(b-1)-1]`` with scale ``r/(2^(b-1)-1)`` otherwise (the first conv sees
      normalised noisy images). It runs as a forward pre-hook of the layer
      (:class:`ActivationQuantizer`) whose scale/zero-point tensors are precomputed per ``apply``.
    * 32 bits means "leave this tensor in float".

Calibration
    On a batch of training images carrying the Gaussian noise the model is certified with
    (``calib_images`` in [0, 1] plus ``sigma * N(0, 1)`` drawn with a fixed seed). Rules:
    ``"max"`` (largest |x|), ``"percentile"`` (the ``percentile``-th percentile of |x|, exact,
    default 99.99) and ``"mse"`` (per bit-width, the range minimising the mean squared
    fake-quantization error of a 2^13-value random sample of the layer's non-zero inputs: a
    32-point grid over (0, max], refined by 32 points around the best).

    Measurement (512 calibration images from the train split, seed 0, weights per channel;
    top-1 accuracy of the base classifier on 2,000 test images with one draw of N(0, 0.25^2)
    noise; "all" = every layer at b bits, "fl8" = first and last layers at 8 bits):

    ==========================================  =========  =====  ==========  =====
    model (sigma 0.25), FP accuracy             policy     max    pct 99.99   mse
    ==========================================  =========  =====  ==========  =====
    LeNet-5 Fashion-MNIST (shipped), FP 86.80   W4A4 all   85.40  85.20       86.05
                                                W4A4 fl8   86.75  86.15       86.60
                                                W3A3 all   75.60  78.55       81.85
                                                W3A3 fl8   82.55  82.70       84.65
    ResNet-20 CIFAR-10 (epoch-5 checkpoint      W4A4 all   53.30  54.55       54.85
    of the run being trained), FP 55.90         W4A4 fl8   56.05  55.85       55.80
                                                W3A3 all   39.50  44.05       48.90
                                                W3A3 fl8   48.00  50.15       51.85
    ==========================================  =========  =====  ==========  =====

    At 4 bits the three rules are within the noise of 2,000 images (about +-0.5 points paired)
    when the first and last layers keep 8 bits, and MSE is best when every layer is at 4 bits;
    at 3 bits MSE is clearly best (+2 to +9 points). At 8 bits all rules are within 0.2 points
    of float, at 6 bits within 0.6. DEFAULT_CALIBRATION is therefore ``"mse"`` (calibration cost: about 1.5 s
    for ResNet-20 on one CPU core, once per model).

Cost on CPU
    ``apply`` re-quantizes only the layers whose bits change: about 0.4 ms for LeNet-5 and 3.6
    ms for ResNet-20 when every layer changes (2 busy CPU cores). The fake-quantized forward
    pass costs 1.2x (LeNet-5) to 1.8x (ResNet-20, batch 500) the float one on CPU: torch's
    fake-quantize kernel is scalar on CPU (about 4x slower per element than a round/clamp/mul
    sequence); with every layer at 32 bits the wrapper costs nothing measurable.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from arq_gym.policy import FLOAT_BITS, MAX_BITS, MIN_BITS, Policy

CALIBRATION_RULES = ("max", "percentile", "mse")
DEFAULT_CALIBRATION = "mse"
#: values kept per layer for the MSE search
MSE_SAMPLE = 1 << 13
MSE_GRID = 32


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer as seen in a traced forward pass (sizes per single input).

    ``kernel``/``stride`` are ``(h, w)`` pairs, ``(1, 1)`` for a linear layer, whose feature
    map is 1 x 1 (``in_h = in_w = out_h = out_w = 1``). ``weights`` counts the weight tensor's
    elements (not the bias); ``macs`` is multiply-accumulates for one input.
    """

    index: int
    name: str
    kind: str  # "conv" | "linear"
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    depthwise: bool
    in_h: int
    in_w: int
    out_h: int
    out_w: int
    weights: int
    macs: int

    def to_dict(self) -> dict:
        """Plain-dict view (JSON friendly)."""
        return asdict(self)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _quantizable(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def find_layers(model: nn.Module, sample_input: torch.Tensor) -> list[LayerInfo]:
    """Quantizable layers (``nn.Conv2d``, ``nn.Linear``) of ``model`` in forward-call order.

    One forward pass of ``sample_input`` (a batch; MACs are per single input) is traced in eval
    mode without gradients; the model's train/eval mode is restored afterwards. Layers never
    called are left out; a layer called several times is listed once with its MACs summed.
    Raises ValueError if the forward pass calls no quantizable layer.
    """
    found: dict[str, dict] = {}

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                batch = x.shape[0] if x.dim() == 4 else 1
                c_out, cpg, kh, kw = mod.weight.shape
                oh, ow = out.shape[-2:]
                macs = kh * kw * cpg * c_out * oh * ow
                rec = {
                    "kind": "conv",
                    "c_in": mod.in_channels,
                    "c_out": c_out,
                    "kernel": (int(kh), int(kw)),
                    "stride": _pair(mod.stride),
                    "groups": mod.groups,
                    "in_h": x.shape[-2],
                    "in_w": x.shape[-1],
                    "out_h": oh,
                    "out_w": ow,
                }
            else:
                batch = x.shape[0] if x.dim() >= 2 else 1
                positions = x.numel() // (batch * mod.in_features)
                macs = mod.in_features * mod.out_features * positions
                rec = {
                    "kind": "linear",
                    "c_in": mod.in_features,
                    "c_out": mod.out_features,
                    "kernel": (1, 1),
                    "stride": (1, 1),
                    "groups": 1,
                    "in_h": 1,
                    "in_w": 1,
                    "out_h": 1,
                    "out_w": 1,
                }
            if name in found:
                found[name]["macs"] += macs
            else:
                rec.update(name=name, macs=macs, weights=mod.weight.numel())
                found[name] = rec

        return hook

    handles = [
        m.register_forward_hook(make_hook(name))
        for name, m in model.named_modules()
        if _quantizable(m)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layer (nn.Conv2d or nn.Linear) "
            "in its forward pass"
        )
    out = []
    for i, rec in enumerate(found.values()):  # dicts keep insertion (= call) order
        depthwise = rec["kind"] == "conv" and rec["groups"] > 1 and rec["groups"] == rec["c_in"]
        ints = {k: v if isinstance(v, (str, tuple)) else int(v) for k, v in rec.items()}
        out.append(LayerInfo(index=i, depthwise=depthwise, **ints))
    return out


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Symmetric fake-quantized copy of a weight tensor (axis 0 = output channel).

    ``bits`` in [2, 8]; at most ``2^bits - 1`` distinct values per output channel.
    """
    qmax = 2 ** (bits - 1) - 1
    w = w.detach()
    if per_channel:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).float().clamp_min(1e-12)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, amax / qmax, zero, 0, -qmax, qmax)
    amax = float(w.abs().max().clamp_min(1e-12))
    return torch.fake_quantize_per_tensor_affine(w, amax / qmax, 0, -qmax, qmax)


def activation_qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit activation: symmetric narrow if signed, else [0, 2^b-1]."""
    if signed:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantizer of a layer's input, run as the layer's forward pre-hook.

    ``ranges[bits]`` is the calibrated clipping range for each bit-width in [2, 8].
    :meth:`set_bits` precomputes the scale and zero-point tensors; 32 disables it.
    """

    def __init__(self, signed: bool, ranges: dict[int, float]):
        super().__init__()
        self.signed = bool(signed)
        self.ranges = {int(b): float(r) for b, r in ranges.items()}
        self.bits = FLOAT_BITS
        self.qmin, self.qmax = 0, 0
        self.register_buffer("scale", torch.ones(()), persistent=False)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)

    def set_bits(self, bits: int) -> None:
        """Use ``bits`` from now on (32 = pass through)."""
        self.bits = int(bits)
        if self.bits == FLOAT_BITS:
            return
        self.qmin, self.qmax = activation_qrange(self.bits, self.signed)
        r = max(self.ranges[self.bits], 1e-8)
        self.scale.fill_(r / self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == FLOAT_BITS:
            return x
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.qmin, self.qmax
        )

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook: quantize the first positional input of ``module``."""
        if self.bits == FLOAT_BITS:
            return None
        return (self.forward(args[0]), *args[1:])

    def extra_repr(self) -> str:
        return f"signed={self.signed}, bits={self.bits}"


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


class QuantizedModel(nn.Module):
    """A fake-quantized copy of a classifier whose per-layer bit-widths are set by :meth:`apply`.

    The constructor deep-copies ``model`` once, keeps the float weights of every quantizable
    layer, attaches an :class:`ActivationQuantizer` as a forward pre-hook of each, and
    calibrates activation ranges on ``calib_images`` (float in [0, 1] or uint8, ``[N, C, H, W]``)
    plus Gaussian noise of std ``sigma`` (fixed ``seed``). The model starts in float
    (all bits 32). ``apply(policy)`` rewrites the quantized weights in place from the stored
    float weights (only layers whose weight bits changed) and sets the activation quantizers;
    no copy of the model is made. Move it with ``.to(device)`` like any module.
    """

    def __init__(
        self,
        model: nn.Module,
        calib_images: torch.Tensor,
        sigma: float,
        per_channel: bool = True,
        calibration: str = DEFAULT_CALIBRATION,
        percentile: float = 99.99,
        seed: int = 0,
        batch_size: int = 256,
    ):
        super().__init__()
        if calibration not in CALIBRATION_RULES:
            raise ValueError(
                f"unknown calibration {calibration!r}; known: {', '.join(CALIBRATION_RULES)}"
            )
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if calib_images.dim() < 2 or calib_images.shape[0] == 0:
            raise ValueError(
                f"calib_images must be a non-empty batch, got {tuple(calib_images.shape)}"
            )
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.per_channel = per_channel
        self.calibration = calibration
        self.sigma = float(sigma)
        device = next(iter(self.model.parameters()), torch.zeros(())).device

        images = calib_images.detach()
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        gen = torch.Generator().manual_seed(seed)
        noisy = images + self.sigma * torch.randn(images.shape, generator=gen)

        self.layers: list[LayerInfo] = find_layers(self.model, noisy[:1].to(device))
        modules = dict(self.model.named_modules())
        self._targets: list[nn.Module] = [modules[layer.name] for layer in self.layers]
        for i, m in enumerate(self._targets):
            self.register_buffer(f"_fp_weight_{i}", m.weight.detach().clone(), persistent=False)

        ranges, signed = self._calibrate(noisy, device, percentile, seed, batch_size)
        self.act_quant = nn.ModuleList(
            ActivationQuantizer(s, r) for s, r in zip(signed, ranges)
        ).to(device)
        for m, aq in zip(self._targets, self.act_quant):
            m.register_forward_pre_hook(aq.pre_hook)
        n = len(self.layers)
        self._w_now = [FLOAT_BITS] * n
        self._a_now = [FLOAT_BITS] * n
        self.last_apply_seconds = 0.0

    # ------------------------------------------------------------------ calibration
    def _calibrate(self, noisy: torch.Tensor, device: torch.device, percentile: float,
                   seed: int, batch_size: int) -> tuple[list[dict[int, float]], list[bool]]:  # fmt: skip
        n_img = noisy.shape[0]
        per_image = []
        for layer in self.layers:
            if layer.kind == "conv":
                per_image.append(layer.c_in * layer.in_h * layer.in_w)
            else:
                per_image.append(layer.macs // max(layer.c_out, 1))  # in_features * positions
        gen = torch.Generator().manual_seed(seed + 1)
        stats = [_Stats(n_img * k, percentile, MSE_SAMPLE, gen) for k in per_image]
        handles = [
            m.register_forward_pre_hook(lambda mod, args, s=s: s.update(args[0]))
            for m, s in zip(self._targets, stats)
        ]
        try:
            with torch.no_grad():
                for start in range(0, n_img, batch_size):
                    self.model(noisy[start : start + batch_size].to(device))
        finally:
            for h in handles:
                h.remove()
        ranges, signed = [], []
        for st in stats:
            is_signed = st.min < 0
            signed.append(is_signed)
            if self.calibration == "max":
                r = {b: st.absmax for b in range(MIN_BITS, MAX_BITS + 1)}
            elif self.calibration == "percentile":
                p = st.percentile_value()
                r = {b: p for b in range(MIN_BITS, MAX_BITS + 1)}
            else:
                sample = torch.cat(st.samples)
                r = {
                    b: _mse_range(sample, st.absmax, b, is_signed)
                    for b in range(MIN_BITS, MAX_BITS + 1)
                }
            ranges.append(r)
        return ranges, signed

    # ------------------------------------------------------------------ policies
    @property
    def num_layers(self) -> int:
        """Number of quantizable layers."""
        return len(self.layers)

    @property
    def policy(self) -> Policy:
        """The policy currently applied (all 32 = float until :meth:`apply` is called)."""
        return Policy(tuple(self._w_now), tuple(self._a_now))

    def fp_weight(self, index: int) -> torch.Tensor:
        """The stored float weight of quantizable layer ``index``."""
        return getattr(self, f"_fp_weight_{index}")

    def apply(self, policy: Policy) -> QuantizedModel:
        """Quantize to ``policy`` in place (weights re-materialised from the float copies);
        returns ``self``. ValueError (one line, naming the layer) for a bad policy."""
        t0 = time.perf_counter()
        policy.check(self.layers)
        with torch.no_grad():
            for i, (wb, ab) in enumerate(zip(policy.w_bits, policy.a_bits)):
                if wb != self._w_now[i]:
                    fp = self.fp_weight(i)
                    w = fp if wb == FLOAT_BITS else quantize_weight(fp, wb, self.per_channel)
                    self._targets[i].weight.copy_(w)
                    self._w_now[i] = wb
                if ab != self._a_now[i]:
                    self.act_quant[i].set_bits(ab)
                    self._a_now[i] = ab
        self.last_apply_seconds = time.perf_counter() - t0
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def calibration_images(split, count: int = 512, seed: int = 0) -> torch.Tensor:
    """``count`` images of a data split (``arq_gym.data.Split``) drawn with a fixed seed, as
    float in [0, 1]; pass them to :class:`QuantizedModel` (take them from the train split)."""
    n = len(split.y)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(count, n)].sort().values
    x = torch.as_tensor(split.x[idx.numpy()])
    return x.float() / 255.0


def uniform_policy(layers: Sequence[LayerInfo] | int, bits: int,
                   keep_first_last: int | None = 8) -> Policy:  # fmt: skip
    """Shortcut for :meth:`Policy.uniform` sized to ``layers``."""
    n = layers if isinstance(layers, int) else len(layers)
    return Policy.uniform(n, bits, keep_first_last)
