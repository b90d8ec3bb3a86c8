"""The deployable integer model: a quantized network exported to ONNX with quantize /
dequantize operators (:func:`export_onnx`) and run in ONNX Runtime (:class:`OnnxClassifier`),
so that the network that ships is the network that was certified.

Graph layout (QDQ, the form every ONNX runtime reads):

* the input of every quantized layer: ``QuantizeLinear -> Clip -> DequantizeLinear``, per
  tensor; unsigned (``uint8`` container, zero point 0) where the calibration saw no negative
  input, else signed (``int8``, zero point 0, narrow range); the integer ``Clip`` to
  ``[qmin, qmax]`` keeps a ``b``-bit activation on its ``2^b`` levels (``2^b - 1`` for signed)
  inside the 8-bit container, since ``QuantizeLinear`` alone saturates only at the container's
  ends (a float ``Clip`` before the ``QuantizeLinear`` is not safe: ONNX Runtime's
  ClipQuantFusion removes it);
* the weight of every quantized layer: an ``int8`` initializer holding the integer codes
  (``|q| <= 2^(b-1) - 1``) and ``DequantizeLinear`` with one scale per output channel
  (``axis=0``), feeding the ``Conv`` / ``Gemm``;
* everything else (normalisation, batch norm, ReLU, residual additions, pooling, biases) in
  float, as the reference computes it.

The graph's metadata (``metadata_props``) holds ``arq.format`` (``arq-onnx/1``), ``arq.policy``
(the w/a bits and layer names as JSON), ``arq.bops_fraction``, ``arq.model``, ``arq.dataset``,
``arq.sigma``, ``arq.num_classes``,
``arq.checkpoint_sha256`` (the base model, or the quantized checkpoint) and
``arq.parent_sha256`` for a fine-tuned checkpoint.

ONNX Runtime computes ``round(x / s)`` where the reference computes ``round(x * (1/s))`` and sums
the convolutions in its own order, so the two agree up to float rounding, like the int8
backend (measured: see :func:`agreement` and ``arq-gym bench-speed``). Needs the optional extra
``pip install -e ".[onnx]"`` (onnx, onnxruntime).
"""

from arq_gym.deploy.export import ONNX_FORMAT, OnnxExportError, export_onnx, read_metadata
from arq_gym.deploy.runtime import ONNX_FUNCTION_ID, OnnxClassifier, agreement

__all__ = [
    "ONNX_FORMAT",
    "ONNX_FUNCTION_ID",
    "OnnxClassifier",
    "OnnxExportError",
    "agreement",
    "export_onnx",
    "read_metadata",
]
