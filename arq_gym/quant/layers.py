"""Layer discovery: the quantizable layers of a model and their sizes, from one traced
forward pass (:func:`find_layers`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["LayerInfo", "find_layers"]


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
