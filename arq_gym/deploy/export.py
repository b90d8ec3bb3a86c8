"""Export of a quantized network to an ONNX graph with QuantizeLinear / DequantizeLinear
operators (the layout is described in :mod:`arq_gym.deploy`).

The graph is traced from the reference quantized network with PyTorch's TorchScript-based ONNX
exporter: every quantized layer is replaced, for the trace only, by a module whose two
:class:`torch.autograd.Function` s compute the reference quantization in PyTorch and emit the QDQ
nodes in ONNX (their ``symbolic``), so the exported arithmetic is the certified one.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arq_gym.policy import FLOAT_BITS, Policy

__all__ = ["ONNX_FORMAT", "OPSET", "OnnxExportError", "export_onnx", "read_metadata"]

ONNX_FORMAT = "arq-onnx/1"
#: opset 13 is the first with per-channel DequantizeLinear (axis); 17 is widely supported
OPSET = 17


class OnnxExportError(ValueError):
    """The network cannot be exported as asked (one-line message)."""


class _ActivationQDQ(torch.autograd.Function):
    """The reference activation quantizer; in ONNX ``QuantizeLinear -> Clip -> DequantizeLinear``."""

    @staticmethod
    def forward(ctx, x, scale, inv_scale, s: float, qmin: int, qmax: int, signed: bool):
        return torch.clamp(x * inv_scale, qmin, qmax).round() * scale

    @staticmethod
    def symbolic(g, x, scale, inv_scale, s: float, qmin: int, qmax: int, signed: bool):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        # the clip acts on the integer codes, between Q and DQ: a float Clip before Q would be
        # fused away by ONNX Runtime's ClipQuantFusion (measured: 2-bit activations then
        # passed through with 8-bit resolution)
        code = torch.int8 if signed else torch.uint8
        step, zero = const(s, torch.float32), const(0, code)
        codes = g.op("QuantizeLinear", x, step, zero)
        codes = g.op("Clip", codes, const(qmin, code), const(qmax, code))
        return g.op("DequantizeLinear", codes, step, zero)


class _WeightDQ(torch.autograd.Function):
    """Integer weight codes times their per-channel scales; in ONNX ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, q, scale):
        return q.float() * scale.view((-1,) + (1,) * (q.dim() - 1))

    @staticmethod
    def symbolic(g, q, scale):
        channels = q.type().sizes()[0]
        zero = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", q, scale, zero, axis_i=0)


class _QDQLayer(nn.Module):
    """A conv or linear layer with its quantized input and integer weight, for the trace."""

    def __init__(self, layer: nn.Module, act, w_bits: int, per_channel: bool):
        super().__init__()
        from arq_gym.quant import weight_integers

        self.layer = layer
        self.act_enabled = bool(act.enabled)
        if self.act_enabled:
            self.act_args = (float(act.scale), int(act.qmin), int(act.qmax), bool(act.signed))
            self.register_buffer("scale", act.scale.detach().clone())
            self.register_buffer("inv_scale", act.inv_scale.detach().clone())
        self.w_quantized = w_bits != FLOAT_BITS
        if self.w_quantized:
            q, w_scale = weight_integers(layer.weight, w_bits, per_channel)
            self.register_buffer("q_weight", q)
            self.register_buffer("w_scale", w_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_enabled:
            x = _ActivationQDQ.apply(x, self.scale, self.inv_scale, *self.act_args)
        m = self.layer
        w = _WeightDQ.apply(self.q_weight, self.w_scale) if self.w_quantized else m.weight
        if isinstance(m, nn.Conv2d):
            return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, m.bias)


def _trace_module(qmodel) -> nn.Module:
    """A copy of ``qmodel``'s network (reference backend, policy applied) whose quantized
    layers are :class:`_QDQLayer` s."""
    net = copy.deepcopy(qmodel.model).eval()
    for m in net.modules():
        m._forward_pre_hooks.clear()
    acts = copy.deepcopy(qmodel.act_quant)
    policy = qmodel.policy
    for i, layer in enumerate(qmodel.layers):
        parent_name, _, attr = layer.name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        target = getattr(parent, attr)
        setattr(parent, attr, _QDQLayer(target, acts[i], policy.w_bits[i], qmodel.per_channel))
    return net


def export_onnx(
    model: nn.Module,
    meta: Mapping[str, Any],
    policy: Policy | None,
    calib_images: torch.Tensor,
    out: str | os.PathLike,
    *,
    sample: torch.Tensor | None = None,
    calibration: str | None = None,
) -> dict[str, Any]:
    """Export ``model`` (a base checkpoint with ``meta``, or a quantized checkpoint whose
    ``meta["quantization"]`` gives the learned ranges and the policy) quantized to ``policy``
    (None: the quantized checkpoint's own) as ONNX to ``out``; returns the metadata written.

    ``calib_images`` calibrate the activation ranges exactly as everywhere else in the package
    (:class:`~arq_gym.quant.QuantizedModel`; ``calibration`` names another rule than the
    default). ``onnx.checker`` validates the graph before it is written. Raises :class:`OnnxExportError` for a policy that does not fit the model.
    """
    import onnx

    from arq_gym.cost import bops_fraction
    from arq_gym.policy import PolicyError
    from arq_gym.quant import QuantizedModel

    record = meta.get("quantization")
    extra = {} if calibration is None else {"calibration": calibration}
    qmodel = QuantizedModel(model.cpu().eval(), calib_images, float(meta["sigma"]), seed=0,
                            quantization=record, **extra)  # fmt: skip
    if policy is None:
        policy = qmodel.checkpoint_policy
        if policy is None:
            raise OnnxExportError("give a policy (--policy or --uniform): the checkpoint is a "
                                  "base model, not a quantized checkpoint")  # fmt: skip
    elif record and (list(policy.w_bits), list(policy.a_bits)) != (record["w_bits"],
                                                                    record["a_bits"]):  # fmt: skip
        raise OnnxExportError("the checkpoint is fine-tuned for its own policy; export it without "
                              "--policy/--uniform")  # fmt: skip
    try:
        qmodel.apply(policy)
    except (PolicyError, ValueError) as exc:
        raise OnnxExportError(str(exc).splitlines()[0]) from None
    net = _trace_module(qmodel)
    x = calib_images[:2] if sample is None else sample
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, not removed
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)  # fmt: skip
    graph = onnx.load_from_string(buf.getvalue())
    props = {
        "arq.format": ONNX_FORMAT,
        "arq.policy": json.dumps({"w_bits": list(policy.w_bits), "a_bits": list(policy.a_bits),
                                  "layers": [layer.name for layer in qmodel.layers]}),  # fmt: skip
        "arq.model": str(meta.get("architecture")),
        "arq.dataset": str(meta.get("dataset")),
        "arq.sigma": repr(float(meta["sigma"])),
        "arq.checkpoint_sha256": str(meta.get("sha256")),
        "arq.parent_sha256": str(meta.get("parent_sha256")),
        "arq.num_classes": str(int(net(x[:1]).shape[1])),
        "arq.bops_fraction": repr(float(bops_fraction(qmodel.layers, policy))),
    }
    onnx.helper.set_model_props(graph, props)
    graph.producer_name = "arq-gym"
    onnx.checker.check_model(graph)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from arq_gym.files import atomic_write_bytes

    atomic_write_bytes(out, graph.SerializeToString())
    return props


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``arq.*`` metadata of an exported graph; OnnxExportError (one line) for a file that
    is not one."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OnnxExportError(f"{path} is not an ONNX model ({type(exc).__name__})") from None
    props = {p.key: p.value for p in graph.metadata_props}
    if props.get("arq.format") != ONNX_FORMAT:
        raise OnnxExportError(f"{path} was not exported by arq-gym export (no {ONNX_FORMAT} "
                              "metadata)")  # fmt: skip
    return props
