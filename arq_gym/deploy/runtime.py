"""An exported model run in ONNX Runtime, as a classifier the certification functions accept."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

__all__ = ["ONNX_FUNCTION_ID", "OnnxClassifier", "agreement"]

#: names the function certified through ONNX Runtime (certificates and JSON carry it)
ONNX_FUNCTION_ID = "onnxruntime-qdq"


class OnnxClassifier:
    """``logits = classifier(images)`` for a graph written by :func:`arq_gym.deploy.export_onnx`,
    run by ONNX Runtime on the CPU with ``threads`` intra-op threads (default: torch's).

    By default ONNX Runtime runs the QDQ graph as written (``session.disable_quant_qdq``): its
    QDQ fusions would change the function (they quantize float biases to int32 and float
    weights to int8, and fuse the rest into integer kernels). Measured on this CPU they are
    also slower here (W4A4 ResNet-20: 588 against 1,079 images/s on one thread, one run on a
    busy machine; LeNet-5 with 2-6 bit layers: 1.3% of noisy predictions changed). ``fuse_qdq=True`` turns them on; the
    :attr:`function_id` then says so.

    Takes and returns torch tensors like a module (``eval``/``to`` are accepted and do
    nothing), so :func:`arq_gym.smoothing.certify` and the incremental path certify it
    unchanged. :attr:`metadata` holds the graph's ``arq.*`` metadata, :attr:`policy` its bits.
    """

    function_id = ONNX_FUNCTION_ID
    training = False

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 fuse_qdq: bool = False):  # fmt: skip
        import onnxruntime as ort

        from arq_gym.deploy.export import read_metadata

        self.path = str(path)
        self.metadata = read_metadata(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        options.add_session_config_entry("session.disable_quant_qdq", "0" if fuse_qdq else "1")
        self.function_id = ONNX_FUNCTION_ID + ("-fused" if fuse_qdq else "")
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @property
    def policy(self):
        """The :class:`~arq_gym.policy.Policy` of the exported network."""
        from arq_gym.policy import Policy

        doc = json.loads(self.metadata["arq.policy"])
        return Policy(tuple(doc["w_bits"]), tuple(doc["a_bits"]))

    @property
    def sigma(self) -> float:
        """The noise level the exported network was certified for."""
        return float(self.metadata["arq.sigma"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(np.asarray(logits))

    def eval(self) -> OnnxClassifier:
        return self

    def to(self, *args, **kwargs) -> OnnxClassifier:
        return self


@torch.inference_mode()
def agreement(a, b, images: torch.Tensor, sigma: float, samples: int, seed: int = 0,
              batch_size: int = 500) -> dict[str, Any]:  # fmt: skip
    """Top-1 predictions of classifiers ``a`` and ``b`` on ``samples`` noisy copies of
    ``images`` (cycled; noise ``N(0, sigma^2)`` from a seeded generator): how many disagree."""
    gen = torch.Generator().manual_seed(seed)
    disagree, done = 0, 0
    while done < samples:
        take = min(batch_size, samples - done)
        idx = torch.arange(done, done + take) % len(images)
        batch = images[idx] + sigma * torch.randn((take, *images.shape[1:]), generator=gen)
        disagree += int((a(batch).argmax(1) != b(batch).argmax(1)).sum())
        done += take
    return {"samples": samples, "disagreements": disagree, "fraction": disagree / samples}
