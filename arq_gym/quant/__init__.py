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

Modules
    :mod:`~arq_gym.quant.layers` (layer discovery), :mod:`~arq_gym.quant.reference` (the
    reference quantizers), :mod:`~arq_gym.quant.calibration` (activation ranges),
    :mod:`~arq_gym.quant.int8` (the int8 backend), :mod:`~arq_gym.quant.folding` (ResNet block
    folding) and :mod:`~arq_gym.quant.model` (:class:`QuantizedModel`, which puts them
    together); everything public is importable from ``arq_gym.quant``.
"""

from __future__ import annotations

from arq_gym.quant.calibration import CALIBRATION_RULES, DEFAULT_CALIBRATION, calibration_images
from arq_gym.quant.folding import FoldedInt8Block
from arq_gym.quant.int8 import (
    Int8Conv2d,
    check_int8_kernel,
    int8_kernels_available,
    weight_integers,
)
from arq_gym.quant.layers import LayerInfo, find_layers
from arq_gym.quant.model import BACKENDS, QuantizedModel, uniform_policy
from arq_gym.quant.reference import ActivationQuantizer, activation_qrange, quantize_weight

__all__ = [
    "BACKENDS",
    "CALIBRATION_RULES",
    "DEFAULT_CALIBRATION",
    "ActivationQuantizer",
    "FoldedInt8Block",
    "Int8Conv2d",
    "LayerInfo",
    "QuantizedModel",
    "activation_qrange",
    "calibration_images",
    "check_int8_kernel",
    "find_layers",
    "int8_kernels_available",
    "quantize_weight",
    "uniform_policy",
    "weight_integers",
]
