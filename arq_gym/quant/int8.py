"""The int8 backend: quantized convolutions as exact integer sums (oneDNN u8 x s8, int32
accumulation), :class:`Int8Conv2d`, the custom ops a compiled graph calls, and
:func:`check_int8_kernel`, which checks that this CPU's kernel sums exactly."""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from arq_gym.policy import FLOAT_BITS, MAX_BITS, MIN_BITS
from arq_gym.quant.reference import ActivationQuantizer

__all__ = ["Int8Conv2d", "check_int8_kernel", "int8_kernels_available", "weight_integers"]


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
