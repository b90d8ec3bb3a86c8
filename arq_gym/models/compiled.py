"""The float32 network under ``torch.compile``: the fastest CPU path for certifying it.

Certifying an FP32 network is nothing but forward passes of noisy batches, so how fast those run
decides how long a certification or an IRS cache takes. Eager PyTorch runs batch norm, ReLU and
(for MobileNetV2) the depthwise convolutions as separate memory-bound passes; inductor with
*freezing* folds batch norm into the convolutions, prepacks the weights for oneDNN and fuses the
element-wise operations. On the project's 2-core CPU that made a width-0.5 CIFAR MobileNetV2
3.4x faster (one run, one thread). Folding and fusing round differently from eager PyTorch, so
this is a measured-agreement path like the int8 backend: the certificate names the function
(``"fp32-compiled"`` against ``"fp32"``).

:func:`fp32_network` is what the certify command and the IRS cache build call: the compiled
network on a CPU (``backend="auto"``) for a certification of at least 100,000 forward passes,
the eager one with ``backend="reference"``, on a GPU, for a small certification (compiling
would cost more than it saves), or when compilation fails (inductor needs a C++ toolchain; a
warning says so).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["MIN_COMPILED_PASSES", "CompiledNetwork", "fp32_network"]


class CompiledNetwork(nn.Module):
    """``model`` (in eval mode, float32) run through ``torch.compile`` with inductor freezing.

    The graph is built on the first forward pass under ``torch.inference_mode`` (freezing
    treats the weights as constants, so change them only through a new instance); the batch
    dimension is dynamic, so the last, partial batch of a certification reuses it.
    """

    function_id = "fp32-compiled"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        # not a submodule: the parameters are registered once, under ``model``
        object.__setattr__(self, "_compiled", torch.compile(self.model, options={"freezing": True}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return self._compiled(x)


#: fewer forward passes than this run eagerly: compiling costs seconds (tens for a ResNet), more
#: than a small certification (a smoke-fidelity IRS cache, a test) takes in all
MIN_COMPILED_PASSES = 100_000


def fp32_network(model: nn.Module, sample: torch.Tensor, backend: str = "auto",
                 forward_passes: int | None = None) -> nn.Module:  # fmt: skip
    """The network to certify ``model`` (float32, eval mode) with.

    :class:`CompiledNetwork` on a CPU with ``backend="auto"`` when the certification makes at
    least :data:`MIN_COMPILED_PASSES` forward passes (``forward_passes``; None: compile), after
    one warm-up pass on ``sample`` (a batch of the size the certification uses, on the model's
    device); else ``model`` itself. A failed compilation warns and returns ``model``. Either way
    ``getattr(net, "function_id", "fp32")`` names the function certified."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"unknown FP32 backend {backend!r}; choose auto or reference")
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    small = forward_passes is not None and forward_passes < MIN_COMPILED_PASSES
    if backend == "reference" or not on_cpu or small:
        return model.eval()
    net = CompiledNetwork(model)
    try:
        with torch.inference_mode():
            net(sample.clone())
    except Exception as exc:  # inductor needs a C++ toolchain; eager needs none
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0]}"
                      "); certifying the FP32 network eagerly", RuntimeWarning, stacklevel=2)  # fmt: skip
        return model.eval()
    return net
