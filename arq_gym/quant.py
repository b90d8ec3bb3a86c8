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
    sequence), so the activation quantizer is written as multiply/clamp/round/multiply, which
    gives the same values as ``torch.fake_quantize_per_tensor_affine`` (tested on ties too);
    with every layer at 32 bits the wrapper costs nothing measurable.

Execution backends (``QuantizedModel(..., backend=...)`` or :meth:`QuantizedModel.set_backend`)
    ``"reference"`` (default) is the definition above, in float32. ``"int8"`` runs every conv
    layer whose weights and activations have at most 8 bits as :class:`Int8Conv2d`: the same
    integer codes, multiplied as uint8 x int8 and summed exactly in int32 by oneDNN, rescaled by
    ``s_a * s_w`` once. It computes the same quantized network without the float32 rounding of
    the reference's products and partial sums, so the two agree up to rounding (a flipped
    rounding of some activation, rarely a flipped class); ``arq-gym bench-speed`` measures the
    agreement. :meth:`QuantizedModel.compile` adds ``torch.compile`` (fuses the quantization,
    batch norm and ReLUs around the integer convolutions; compiled once, reused by every
    policy). In a CIFAR ResNet block whose two convolutions are both int8, the first one's batch
    norm, ReLU and the second one's activation quantizer are folded into the oneDNN call, which
    writes the uint8 codes directly (:class:`FoldedInt8Block`; the same integer sums, a
    differently rounded float epilogue). :attr:`QuantizedModel.function_id` names the function
    computed.
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from arq_gym.models.architectures import BasicBlock, PadShortcut
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
        self.enabled = False  # a bool, not the bits: torch.compile guards on it, not on bits
        self.qmin, self.qmax = 0, 0
        # the clamp bounds as tensors too, so that a compiled graph serves every bit-width
        self.register_buffer("qlo", torch.zeros(()), persistent=False)
        self.register_buffer("qhi", torch.zeros(()), persistent=False)
        self.register_buffer("scale", torch.ones(()), persistent=False)
        self.register_buffer("inv_scale", torch.ones(()), persistent=False)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)

    def set_bits(self, bits: int) -> None:
        """Use ``bits`` from now on (32 = pass through)."""
        self.bits = int(bits)
        self.enabled = self.bits != FLOAT_BITS
        if not self.enabled:
            return
        self.qmin, self.qmax = activation_qrange(self.bits, self.signed)
        self.qlo.fill_(self.qmin)
        self.qhi.fill_(self.qmax)
        r = max(self.ranges[self.bits], 1e-8)
        self.scale.fill_(r / self.qmax)
        # float32 reciprocal, as torch's fake-quantize kernel computes it (1.0f / scale)
        self.inv_scale.copy_(torch.ones_like(self.scale) / self.scale)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integers ``clamp(nearbyint(x * (1/scale)), qmin, qmax)`` as float (not scaled).

        Clamping before rounding gives the same integers (``qmin``/``qmax`` are integers and
        rounding is monotone); ``torch.round`` rounds half to even like ``std::nearbyint``.
        """
        return torch.clamp(x * self.inv_scale, self.qlo, self.qhi).round_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``x``; bit-identical to ``torch.fake_quantize_per_tensor_affine(x,
        scale, 0, qmin, qmax)`` (tested) but written as multiply/clamp/round/multiply, which is
        vectorised on CPU where torch's fake-quantize kernel is not."""
        if not self.enabled:
            return x
        return self.quantize(x).mul_(self.scale)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook: quantize the first positional input of ``module``."""
        if not self.enabled:
            return None
        return (self.forward(args[0]), *args[1:])

    def extra_repr(self) -> str:
        return f"signed={self.signed}, bits={self.bits}"


BACKENDS = ("reference", "int8", "int8-compiled", "auto")


def weight_integers(w_fq: torch.Tensor, bits: int, per_channel: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Integers and scales of a weight fake-quantized by :func:`quantize_weight`.

    Returns ``(q, scale)``: ``q`` int8 with ``|q| <= 2^(bits-1)-1`` and ``scale`` float32 per
    output channel, such that ``q * scale`` (in float32) equals ``w_fq`` element for element
    (checked; ValueError otherwise).
    """
    qmax = 2 ** (bits - 1) - 1
    flat = w_fq.detach().reshape(w_fq.shape[0], -1)
    if per_channel:
        scale = flat.abs().amax(dim=1).float().clamp_min(1e-12) / qmax
    else:
        scale = (flat.abs().max().float().clamp_min(1e-12) / qmax).expand(w_fq.shape[0])
    view = (-1,) + (1,) * (w_fq.dim() - 1)
    q = torch.round(w_fq / scale.view(view)).clamp_(-qmax, qmax)
    if not torch.equal(q * scale.view(view), w_fq):
        raise ValueError("the fake-quantized weight is not integers times its scale")
    return q.to(torch.int8), scale.contiguous()


def int8_kernels_available() -> bool:
    """Whether this torch build has the oneDNN int8 convolution (CPU)."""
    ops = getattr(torch.ops, "onednn", None)
    try:
        return (
            ops is not None and hasattr(ops, "qconv2d_pointwise") and hasattr(ops, "qconv_prepack")
        )
    except (RuntimeError, AttributeError):  # pragma: no cover - build without oneDNN
        return False


#: live int8 layers by key, read by the ``arq_gym::int8_conv`` op (keeps compiled graphs
#: independent of the policy: the op looks up the current packed weights at run time). The key
#: reaches the op as a tensor, not an int: torch.compile treats int module attributes as
#: constants, so an int key would compile one graph per model copy (and fall back to eager
#: after ``recompile_limit`` copies); a tensor key lets every copy share one graph.
_INT8_LAYERS: weakref.WeakValueDictionary[int, Int8Conv2d] = weakref.WeakValueDictionary()
_INT8_NEXT_KEY = [0]


@torch.library.custom_op("arq_gym::int8_conv", mutates_args=())
def _int8_conv_op(codes: torch.Tensor, key: torch.Tensor, geometry: list[int]) -> torch.Tensor:
    """oneDNN u8 x s8 convolution of activation codes with layer ``key``'s current weights
    (``geometry``: out_channels, kernel, stride, padding, dilation; for shape inference)."""
    return _INT8_LAYERS[int(key)].conv_codes(codes)


@torch.library.custom_op("arq_gym::int8_conv_folded", mutates_args=())
def _int8_conv_folded_op(codes: torch.Tensor, key: torch.Tensor, geometry: list[int]
                         ) -> torch.Tensor:  # fmt: skip
    """The same convolution with the following batch norm, ReLU and the next layer's activation
    quantizer folded in (:meth:`Int8Conv2d.fold`): uint8 codes for the next layer."""
    return _INT8_LAYERS[int(key)].conv_codes_folded(codes)


def _conv_output_like(codes: torch.Tensor, geometry: list[int], dtype: torch.dtype
                      ) -> torch.Tensor:  # fmt: skip
    n, _c, h, w = codes.shape
    out_channels, kh, kw, sh, sw, ph, pw, dh, dw = geometry
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return codes.new_empty((n, out_channels, oh, ow), dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )


@_int8_conv_op.register_fake
def _int8_conv_fake(codes: torch.Tensor, key: torch.Tensor, geometry: list[int]) -> torch.Tensor:
    return _conv_output_like(codes, geometry, torch.float32)


@_int8_conv_folded_op.register_fake
def _int8_conv_folded_fake(codes: torch.Tensor, key: torch.Tensor, geometry: list[int]
                           ) -> torch.Tensor:  # fmt: skip
    return _conv_output_like(codes, geometry, torch.uint8)


class Int8Conv2d(nn.Module):
    """A quantized ``nn.Conv2d`` run as integer arithmetic (oneDNN u8 x s8, int32 accumulation).

    Installed once in place of a conv layer (``backend="int8"``); :meth:`refresh` re-packs the
    weights when the policy changes. While weights and activations both have at most 8 bits it
    computes ``out = s_a * s_w[c] * sum(q_a * q_w) + bias``, where ``q_a`` are exactly the
    integers the reference activation quantizer produces (:meth:`ActivationQuantizer.quantize`)
    and ``q_w`` the integers of the reference fake-quantized weight (:func:`weight_integers`).
    The integer sum is exact for every input: ``|sum| <= k_h*k_w*c_in/groups * 127 * 255``,
    far below 2^31 (int32 accumulation; :func:`check_int8_kernel` verifies the kernel on this
    CPU, including the inputs where kernels without VNNI saturate 16-bit intermediates). The
    reference layer computes the same sum in float32, rounding every product and partial sum,
    so the two differ by float rounding only (a few ulps of the output), which can move an
    activation of the next layer across a rounding boundary. Signed activations (the first
    layer's normalised input) are stored as ``q + 128`` with zero point 128. Output: float32,
    channels_last. Otherwise (a float side) the wrapped reference conv runs.
    """

    def __init__(self, conv: nn.Conv2d, act: ActivationQuantizer, per_channel: bool = True):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("Int8Conv2d needs numeric zero padding")
        self.conv = conv
        self.act = act
        self.per_channel = per_channel
        self.kernel = tuple(conv.kernel_size)
        self.out_channels = int(conv.out_channels)
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self.dilation = list(conv.dilation)
        self.groups = int(conv.groups)
        self.x_zp = 128 if act.signed else 0
        self.active = False
        self.packed = None
        self.q_weight: torch.Tensor | None = None
        # (batch norm, next activation quantizer) folded into a second packing, the bits it was
        # packed for (this layer's, the next quantizer's) and that packing
        self.fold_with: tuple[nn.BatchNorm2d, ActivationQuantizer] | None = None
        self.fold_bits: tuple | None = None
        self.folded: tuple | None = None
        self.bits = (FLOAT_BITS, FLOAT_BITS)
        (kh, kw), (ph, pw) = self.kernel, self.padding
        self.geometry = [self.out_channels, kh, kw, *self.stride, ph, pw, *self.dilation]
        self.key = _INT8_NEXT_KEY[0]
        _INT8_NEXT_KEY[0] += 1
        _INT8_LAYERS[self.key] = self
        self.register_buffer("key_t", torch.tensor(self.key), persistent=False)

    def __deepcopy__(self, memo: dict) -> Int8Conv2d:
        # a copy gets its own key (the op looks layers up by key) and its own packed weights
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in ("packed", "folded")}
        new.__dict__.update(copy.deepcopy(state, memo))
        new.key = _INT8_NEXT_KEY[0]
        _INT8_NEXT_KEY[0] += 1
        _INT8_LAYERS[new.key] = new
        new.key_t = torch.tensor(new.key)
        new.packed = new.folded = None
        if new.active:
            fold_with = new.fold_with
            new.refresh(*new.bits)
            if fold_with is not None:
                new.fold(*fold_with)
        return new

    def refresh(self, w_bits: int, a_bits: int) -> None:
        """Re-pack for the conv's current (fake-quantized) weight and the activation quantizer's
        current bits; ``w_bits``/``a_bits`` are the layer's bits (32 = float)."""
        self.bits = (int(w_bits), int(a_bits))
        self.active = FLOAT_BITS not in self.bits
        self.folded = self.fold_with = self.fold_bits = None
        if not self.active:
            self.packed = self.q_weight = None
            return
        q, w_scale = weight_integers(self.conv.weight, w_bits, self.per_channel)
        self.q_weight = q
        self.x_scale = float(self.act.scale)
        self.w_scale = w_scale
        self.w_zp = torch.zeros(q.shape[0], dtype=torch.int64)
        self.bias_fp = None if self.conv.bias is None else self.conv.bias.detach().float()
        self.packed = torch.ops.onednn.qconv_prepack(
            q.contiguous(memory_format=torch.channels_last), w_scale, self.x_scale, self.x_zp,
            self.stride, self.padding, self.dilation, self.groups, None,
        )  # fmt: skip

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 channels_last activation codes ``q + zero point``, ``q`` from the reference
        quantizer itself (:meth:`ActivationQuantizer.quantize`)."""
        q = self.act.quantize(x)
        if self.x_zp:
            q = q + self.x_zp
        return q.to(torch.uint8, memory_format=torch.channels_last)

    def conv_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The integer convolution of activation codes, rescaled to float32."""
        return torch.ops.onednn.qconv2d_pointwise(
            codes, self.x_scale, self.x_zp, self.packed, self.w_scale, self.w_zp, self.bias_fp,
            self.stride, self.padding, self.dilation, self.groups, 1.0, 0, torch.float32, "none",
            [], "",
        )  # fmt: skip

    def fold(self, bn: nn.BatchNorm2d, next_act: ActivationQuantizer) -> None:
        """Also pack ``codes -> next_act's codes of relu(bn(conv))`` as one oneDNN call.

        Eval-mode batch norm is a per-channel affine map ``g * y + h``, so it folds into the
        per-channel output scale (``s_a * s_w[c] * g[c]``; where ``g[c] < 0`` the integer
        weights change sign, exactly) and the bias; ReLU and the next quantizer's clamp become a
        clip to ``[0, qmax * s]`` and oneDNN rounds ``y / s`` to the nearest integer (ties to
        even) and writes uint8. The integer sums are the same as :meth:`conv_codes`'s; only
        the float epilogue is rounded differently, so this is a measured-agreement path like
        the rest of the int8 backend. Needs unsigned ``next_act`` with at most 8 bits.
        """
        if not self.active or next_act.signed or not next_act.enabled:
            raise ValueError("fold needs an active int8 layer and an unsigned next quantizer")
        with torch.no_grad():
            g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).float()
            shift = (bn.bias - bn.running_mean * g).float()
            if self.bias_fp is not None:
                shift = shift + g * self.bias_fp
            sign = torch.where(g < 0, -1, 1).to(torch.int8).view(-1, 1, 1, 1)
            scale = (self.w_scale * g.abs()).contiguous()
            packed = torch.ops.onednn.qconv_prepack(
                (self.q_weight * sign).contiguous(memory_format=torch.channels_last), scale,
                self.x_scale, self.x_zp, self.stride, self.padding, self.dilation, self.groups,
                None,
            )  # fmt: skip
        out_scale = float(next_act.scale)
        self.fold_with = (bn, next_act)
        self.fold_bits = (self.bits, next_act.bits)
        self.folded = (packed, scale, shift.contiguous(), out_scale, next_act.qmax * out_scale)

    def conv_codes_folded(self, codes: torch.Tensor) -> torch.Tensor:
        """The folded convolution (:meth:`fold`): uint8 codes of the next layer."""
        packed, scale, shift, out_scale, hi = self.folded
        return torch.ops.onednn.qconv2d_pointwise(
            codes, self.x_scale, self.x_zp, packed, scale, self.w_zp, shift, self.stride,
            self.padding, self.dilation, self.groups, out_scale, 0, None, "hardtanh", [0.0, hi],
            "",
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.conv(x)
        return _int8_conv_op(self.codes(x), self.key_t, self.geometry)


class FoldedInt8Block(nn.Module):
    """A CIFAR ResNet :class:`~arq_gym.models.architectures.BasicBlock` whose two convolutions
    both run in int8: the first writes the second's uint8 codes directly
    (:meth:`Int8Conv2d.fold`), so its float output never goes to memory. Installed by the int8
    backend in place of the block; ``block`` is the original (its convs are the int8 layers)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        codes = _int8_conv_folded_op(b.conv1.codes(x), b.conv1.key_t, b.conv1.geometry)
        # The float work after the second convolution runs on NHWC views of the channels_last
        # tensors: a compiled graph then lays its buffers out like the convolutions (its
        # default layout is contiguous in the logical order), where NCHW views made it
        # transpose tiles in every block after the first option-A shortcut.
        out = _int8_conv_op(codes, b.conv2.key_t, b.conv2.geometry).permute(0, 2, 3, 1)
        bn = b.bn2  # eval-mode batch norm, written out on the last (channel) dimension
        out = (out - bn.running_mean) * torch.rsqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        shortcut = x.permute(0, 2, 3, 1)  # BasicBlock's shortcut: identity or option A
        if isinstance(b.shortcut, PadShortcut):
            half = b.shortcut.extra // 2
            shortcut = nn.functional.pad(shortcut[:, ::2, ::2, :], (half, b.shortcut.extra - half))
        return nn.functional.relu(out + shortcut).permute(0, 3, 1, 2)


_INT8_KERNEL_OK: bool | None = None


def check_int8_kernel() -> bool:
    """True if the int8 convolution kernel sums exactly on this CPU (cached per process).

    Runs one convolution on extreme codes (activations 0/255, weights +-127, 576 terms, the
    case where kernels without VNNI saturate 16-bit intermediates) and on random codes, and
    compares with the exact integer result computed in float64.
    """
    global _INT8_KERNEL_OK
    if _INT8_KERNEL_OK is not None:
        return _INT8_KERNEL_OK
    if not int8_kernels_available():
        _INT8_KERNEL_OK = False
        return False
    gen = torch.Generator().manual_seed(0)
    c_in, c_out = 64, 16
    w = torch.randint(-127, 128, (c_out, c_in, 3, 3), generator=gen).float()
    w[0] = 127.0
    w[1] = -127.0
    w[2, :, :, :] = torch.where(torch.arange(c_in).view(-1, 1, 1) % 2 == 0, 127.0, -127.0)
    x = torch.randint(0, 256, (3, c_in, 6, 6), generator=gen).float()
    x[0] = 255.0
    x[1] = torch.where(torch.arange(c_in).view(-1, 1, 1) % 2 == 0, 255.0, 0.0)
    ok = True
    for signed in (False, True):
        aq = ActivationQuantizer(signed, {b: 1.0 for b in range(MIN_BITS, MAX_BITS + 1)})
        aq.set_bits(8)
        aq.scale.fill_(1.0)
        aq.inv_scale.fill_(1.0)
        xs = x - 128.0 if signed else x
        xs = xs.clamp(aq.qmin, aq.qmax)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(w)
        try:
            layer = Int8Conv2d(conv, aq)
            layer.refresh(8, 8)
            out = layer(xs)
            _INT8_LAYERS.pop(layer.key, None)
        except (RuntimeError, ValueError):
            ok = False
            break
        exact = nn.functional.conv2d(xs.double(), w.double(), padding=1)
        ok = ok and torch.equal(out, exact.float())  # the exact sum, rounded once to fp32
    _INT8_KERNEL_OK = bool(ok)
    return _INT8_KERNEL_OK


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

    ``quantization`` is the ``quantization`` record of a quantized checkpoint written by
    ``arq-gym finetune`` (:mod:`arq_gym.finetune`): its learned activation ranges replace the
    calibrated ones at the bit-widths it was fine-tuned for, so that applying
    :attr:`checkpoint_policy` gives the fine-tuned network (weights are quantized from the
    checkpoint's latent float weights by the same rule as always).
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
        backend: str = "reference",
        quantization: dict | None = None,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
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
        self.quantization = None
        if quantization:
            self._use_learned_ranges(quantization)
        n = len(self.layers)
        self._w_now = [FLOAT_BITS] * n
        self._a_now = [FLOAT_BITS] * n
        self.last_apply_seconds = 0.0
        self._parents = [self._parent_of(layer.name) for layer in self.layers]
        self._int8: list[Int8Conv2d | None] = [None] * n
        # ResNet basic blocks: (parent, attribute, block, its folded int8 form)
        self._blocks = [
            (*self._parent_of(name), m, FoldedInt8Block(m))
            for name, m in self.model.named_modules()
            if isinstance(m, BasicBlock)
        ]
        self.fold_blocks = True
        object.__setattr__(self, "_compiled", None)
        self.backend = "reference"
        self.set_backend(backend)

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

    def _use_learned_ranges(self, record: dict) -> None:
        """Take a quantized checkpoint's ``quantization`` record (:mod:`arq_gym.finetune`):
        its learned activation ranges replace the calibrated ones at the bits it was trained
        for, with its signedness; other bit-widths keep their calibrated ranges."""
        names = record.get("layers")
        if names is not None and list(names) != [layer.name for layer in self.layers]:
            raise ValueError("the checkpoint's quantization record names other layers than the "
                             "model has")  # fmt: skip
        a_bits, ranges = record["a_bits"], record["act_ranges"]
        signed = record.get("act_signed") or [None] * len(ranges)
        if not len(a_bits) == len(ranges) == len(self.layers):
            raise ValueError(f"the quantization record covers {len(ranges)} layers, the model "
                             f"has {len(self.layers)}")  # fmt: skip
        for aq, b, r, s in zip(self.act_quant, a_bits, ranges, signed):
            if r is None or b == FLOAT_BITS:
                continue
            if s is not None:
                aq.signed = bool(s)
            aq.ranges[int(b)] = float(r)
        self.quantization = dict(record)

    @property
    def checkpoint_policy(self) -> Policy | None:
        """The policy a quantized checkpoint was fine-tuned for (None for a base model)."""
        if not self.quantization:
            return None
        return Policy(tuple(self.quantization["w_bits"]), tuple(self.quantization["a_bits"]))

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
            if self.backend == "int8":
                self._sync_int8()
        self.last_apply_seconds = time.perf_counter() - t0
        return self

    # ------------------------------------------------------------------ execution backends
    def _parent_of(self, name: str) -> tuple[nn.Module, str]:
        parent_name, _, attr = name.rpartition(".")
        return (self.model.get_submodule(parent_name) if parent_name else self.model), attr

    def _int8_eligible(self, i: int) -> bool:
        m = self._targets[i]
        return (
            isinstance(m, nn.Conv2d)
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
            and m.weight.device.type == "cpu"
        )

    def _sync_int8(self) -> None:
        """With backend int8: an :class:`Int8Conv2d` in place of every eligible conv layer
        (installed once, re-packed when its bits change); otherwise the reference layers."""
        for i, m in enumerate(self._targets):
            parent, attr = self._parents[i]
            slot = self._int8[i]
            if self.backend != "int8" or not self._int8_eligible(i):
                setattr(parent, attr, m)
                continue
            if slot is None:
                slot = self._int8[i] = Int8Conv2d(m, self.act_quant[i], self.per_channel)
            if slot.bits != (self._w_now[i], self._a_now[i]):
                slot.refresh(self._w_now[i], self._a_now[i])
            setattr(parent, attr, slot)
        for parent, attr, block, folded in self._blocks:
            c1, c2 = block.conv1, block.conv2
            ok = (
                self.fold_blocks
                and isinstance(c1, Int8Conv2d) and c1.active
                and isinstance(c2, Int8Conv2d) and c2.active and not c2.act.signed
            )  # fmt: skip
            if ok and c1.fold_bits != (c1.bits, c2.act.bits):
                c1.fold(block.bn1, c2.act)
            setattr(parent, attr, folded if ok else block)

    def set_folding(self, enabled: bool) -> QuantizedModel:
        """Whether the int8 backend folds ResNet blocks (:class:`FoldedInt8Block`; on by
        default); returns ``self``. Off, every int8 conv writes float32 (for comparisons)."""
        self.fold_blocks = bool(enabled)
        with torch.no_grad():
            self._sync_int8()
        return self

    def set_backend(self, backend: str) -> QuantizedModel:
        """Choose how quantized layers execute; returns ``self``.

        * ``"reference"``: fake quantization in float32 (activation pre-hooks, convolution of
          the fake-quantized weights), the definition of the quantized network.
        * ``"int8"``: every conv layer with weights and activations of at most 8 bits runs as
          :class:`Int8Conv2d` (exact integer sums, oneDNN, CPU only); float layers and linear
          layers stay as in the reference; ResNet blocks with both convolutions in int8 run as
          :class:`FoldedInt8Block`. It agrees with the reference up to float rounding
          (bench-speed reports the measured agreement). ValueError where the kernel is
          unavailable or inexact on this CPU (:func:`check_int8_kernel`) or the model is not
          on the CPU.
        * ``"int8-compiled"``: ``"int8"`` under :meth:`compile` (the fastest CPU path; the
          compiled graph is built on the first forward pass, a few seconds).
        * ``"auto"``: ``"int8-compiled"`` where the int8 kernel is available, else
          ``"reference"``. Callers that cannot afford a failed compilation at run time use
          :meth:`warm_up`, which falls back to eager ``"int8"`` with a warning.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        on_cpu = all(m.weight.device.type == "cpu" for m in self._targets)
        if backend == "auto":
            backend = "int8-compiled" if on_cpu and check_int8_kernel() else "reference"
        compiled = backend == "int8-compiled"
        backend = "int8" if compiled else backend
        if backend == "int8":
            if not on_cpu:
                raise ValueError("backend 'int8' runs on the CPU only; move the model to the CPU")
            if not check_int8_kernel():
                raise ValueError("backend 'int8' is not available: this torch/CPU has no exact "
                                 "oneDNN int8 convolution")  # fmt: skip
        self.backend = backend
        with torch.no_grad():
            self._sync_int8()
        return self.compile() if compiled else self.uncompile()

    def warm_up(self, sample: torch.Tensor) -> QuantizedModel:
        """Run one forward pass on ``sample`` (a batch of the size that will be used) so that a
        compiled graph is built now; if compilation fails, warn and continue eagerly (the
        :attr:`function_id` then says so). Returns ``self``; :attr:`warmed_up` is then true
        until the next :meth:`compile`."""
        object.__setattr__(self, "_warmed_up", True)
        if not self.compiled:
            return self
        try:
            with torch.inference_mode():  # the certification's inputs are inference tensors
                self(sample.clone())
        except Exception as exc:  # inductor needs a C++ toolchain; eager int8 needs none
            import warnings

            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0]}"
                          "); running the int8 backend eagerly", RuntimeWarning, stacklevel=2)
            self.uncompile()
        return self

    @property
    def function_id(self) -> str:
        """Names the function this model computes: ``"fake-quant-fp32"`` (reference),
        ``"int8-exact-sums"`` (int8 backend; same quantized network, integer dot products summed
        exactly instead of in float32), ``"int8-exact-sums-folded"`` (the same for a model with
        ResNet basic blocks, whose first convolution's epilogue is folded into the integer
        convolution: :class:`FoldedInt8Block`), each with ``"-compiled"`` appended when the float
        operations around the convolutions are fused by ``torch.compile``."""
        if self.backend != "int8":
            return "fake-quant-fp32"
        name = "int8-exact-sums-folded" if self._blocks and self.fold_blocks else "int8-exact-sums"
        return name + "-compiled" if self.compiled else name

    def _apply(self, fn, *args, **kwargs):  # called by .to(), .cuda(), .float(), ...
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "backend", "reference") == "int8" and not all(
            m.weight.device.type == "cpu" for m in self._targets
        ):
            self.set_backend("reference").uncompile()
        return out

    def compile(self, **kwargs) -> QuantizedModel:
        """Run the forward pass through ``torch.compile(self.model, **kwargs)`` from now on
        (``None``-safe: call :meth:`uncompile` to go back); returns ``self``.

        With the int8 backend the compiled graph fuses the activation quantization, batch norm,
        residual additions and ReLUs around the integer convolutions (an opaque custom op that
        reads the current packed weights), and policies that keep every layer's weights and
        activations within 2-8 bits (or keep its float sides) reuse the compiled graph: the bits
        live in buffers, not in the graph. Fused float arithmetic may round differently from
        eager PyTorch, so this is a measured-agreement path like the int8 backend itself.
        """
        object.__setattr__(self, "_compiled", torch.compile(self.model, **kwargs))
        object.__setattr__(self, "_warmed_up", False)
        return self

    @property
    def warmed_up(self) -> bool:
        """Whether :meth:`warm_up` has run since the last :meth:`compile` (always true when
        eager: there is nothing to build)."""
        return not self.compiled or getattr(self, "_warmed_up", False)

    def uncompile(self) -> QuantizedModel:
        """Back to eager execution; returns ``self``."""
        object.__setattr__(self, "_compiled", None)
        return self

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile` is in effect."""
        return self.__dict__.get("_compiled") is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            return self.model(x)
        # a dynamic batch dimension, every other size static: one graph serves every batch
        # size (the last, partial batch of a certification would otherwise compile a second
        # one), and its kernels know the channel and spatial sizes (``dynamic=True`` made
        # them generic: 5-17% slower on ResNet-20 in three paired runs)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return compiled(x)


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
