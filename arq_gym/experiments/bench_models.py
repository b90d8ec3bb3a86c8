"""Speed of the other architectures: ``arq-gym bench-speed --models resnet50,mobilenet_v2,...``.

For each architecture, measured in one run on this machine:

* FLOPs per sample (2 x MACs of :func:`~arq_gym.quant.find_layers`) and the throughput limits
  they allow at the machine's measured GEMM peaks (:func:`~arq_gym.experiments.bench_speed.
  gemm_peaks`);
* noisy-sample throughput of uniform W4A4 (first and last layer at 8 bits) through every
  execution path at a batch size sized to the input (8 at 224 x 224 on a CPU, as the problems
  use): ``fp32`` (the float network), ``fp32-compiled`` (the same under ``torch.compile``, the
  path FP32 certifications take: :mod:`arq_gym.models.compiled`), ``fp32-reference`` (fake
  quantization), ``int8`` and ``int8-compiled`` where oneDNN has exact kernels; top-1 agreement
  of the int8 paths with the reference and of ``fp32-compiled`` with ``fp32`` on the same
  samples;
* the W4A4 network certified (CERTIFY, the real pipeline) at a reduced setting (2 images,
  n = 100), whose time over its pure forward time is the pipeline's overhead, and from the
  measured throughput and that overhead the figures for the full "search" fidelity (100 images,
  n_p = 500 per policy, an upper bound: IRS samples at most n_p per image; n = 10,000 for the
  one-off FP32 cache): seconds per episode, hours per 200-episode search.

Weights: the shipped model where one exists, else a seeded random initialisation; images are
seeded uniform noise in [0, 1] at the architecture's input size (no ImageNet here), which is
all a throughput needs. With ``device="cuda"`` the float paths run on the GPU (the int8 paths
are CPU kernels), so a user with a GPU measures the GPU figures with the same command; on a
machine without one the result says the GPU was not measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from arq_gym.experiments.bench_speed import (
    _noisy_batches,
    _throughputs,
    gemm_peaks,
    throughput_limits,
)
from arq_gym.fidelity import get_fidelity
from arq_gym.models.compiled import CompiledNetwork, fp32_network

#: architectures the command knows, with their input shape
INPUT_SHAPES = {"resnet50": (3, 224, 224), "mobilenet_v2": (3, 224, 224),
                "mobilenet_v2_cifar": (3, 32, 32), "resnet20": (3, 32, 32),
                "lenet5": (1, 28, 28)}  # fmt: skip
SEARCH_EPISODES = 200  # the table's and the paper's search length


def _model(arch: str, sigma: float) -> tuple[torch.nn.Module, str]:
    from arq_gym.models import ZooError, build, load_shipped

    try:
        model, _meta = load_shipped(arch, sigma=sigma)
        return model.eval(), f"shipped, sigma {sigma}"
    except (ZooError, FileNotFoundError, ValueError):
        torch.manual_seed(0)
        return build(arch).eval(), "random init (seed 0)"


def model_row(arch: str, peaks: dict, batch_size: int | None = None, batches: int = 3,
              reduced: tuple[int, int, int] = (2, 20, 100), sigma: float = 0.25,
              compile: bool = True, device: str = "cpu",
              say: Callable[[str], None] = lambda _m: None) -> dict:  # fmt: skip
    """The measurements of the module docstring for one architecture. ``reduced``: images,
    n0 and n of the measured CERTIFY run."""
    from arq_gym.problem import default_batch_size
    from arq_gym.quant import QuantizedModel, check_int8_kernel, uniform_policy
    from arq_gym.smoothing import certify

    if arch not in INPUT_SHAPES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(INPUT_SHAPES)}")
    shape = INPUT_SHAPES[arch]
    dev = torch.device(device)
    model, weights = _model(arch, sigma)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((16, *shape), generator=gen)
    t0 = time.perf_counter()  # layers found and ranges calibrated on the CPU, then moved
    qref = QuantizedModel(model, images, sigma, seed=0).to(dev).eval()
    calibration_seconds = time.perf_counter() - t0
    model.to(dev)
    layers = qref.layers
    flops = 2 * sum(layer.macs for layer in layers)
    bs = batch_size or default_batch_size(shape, dev.type, "int8" if dev.type == "cpu" else "reference")
    say(f"{arch}: {len(layers)} layers, {flops / 1e9:.2f} GFLOP per sample, batch {bs}")
    w4a4 = uniform_policy(layers, 4)
    qref.apply(w4a4)
    paths = {"fp32-reference": qref}
    skipped = {}
    if dev.type == "cpu" and check_int8_kernel():
        import copy

        paths["int8"] = copy.deepcopy(qref).set_backend("int8").apply(w4a4)
        if compile:
            say(f"{arch}: compiling the int8 model")
            qc = copy.deepcopy(qref).set_backend("int8-compiled").apply(w4a4)
            qc.warm_up(_noisy_batches(images, sigma, bs, 1, 99)[0])
            paths["int8-compiled"] = qc
        else:
            skipped["int8-compiled"] = "compile disabled"
    else:
        skipped["int8"] = ("int8 kernels run on the CPU" if dev.type != "cpu"
                           else "no exact oneDNN int8 convolution on this torch/CPU")  # fmt: skip
    data = [x.to(dev) for x in _noisy_batches(images, sigma, bs, batches, 0)]
    floats: dict[str, torch.nn.Module] = {"fp32": model}
    if dev.type != "cpu":
        skipped["fp32-compiled"] = "certifications compile the FP32 network on a CPU only"
    elif not compile:
        skipped["fp32-compiled"] = "compile disabled"
    else:
        say(f"{arch}: compiling the fp32 model")
        fast = fp32_network(model, data[0])
        if isinstance(fast, CompiledNetwork):
            floats["fp32-compiled"] = fast
        else:
            skipped["fp32-compiled"] = "torch.compile failed"
    say(f"{arch}: throughput")
    nets = {**floats, **paths}
    sps = _throughputs(nets, data)
    agreement = {}
    with torch.inference_mode():
        for ref_name, others in (("fp32-reference", paths), ("fp32", floats)):
            refs = [nets[ref_name](x).argmax(1) for x in data]
            for name, net in others.items():
                if name != ref_name:
                    dis = sum(int((net(x).argmax(1) != r).sum()) for x, r in zip(data, refs))
                    agreement[name] = {"samples": bs * len(data), "disagreements": dis}
    best_float = max(floats, key=lambda p: sps[p])
    limits = throughput_limits(peaks, flops)
    best_path = max(paths, key=lambda p: sps[p])
    best = sps[best_path]
    arith = "int8" if best_path.startswith("int8") else "fp32"

    # the real pipeline at a reduced setting: CERTIFY of the W4A4 network on a few images
    # (every image takes n0 + n samples; with IRS an image takes at most n_p of them)
    n_img, n0, n = reduced
    say(f"{arch}: CERTIFY at a reduced setting ({n_img} images, n0={n0}, n={n})")
    t0 = time.perf_counter()
    with torch.inference_mode():
        cert = certify(paths[best_path], images[:n_img], np.zeros(n_img, dtype=np.int64), sigma,
                       n0=n0, n=n, batch_size=bs, device=dev, progress=False)  # fmt: skip
    policy_seconds = time.perf_counter() - t0
    passes = int(cert.forward_passes)
    overhead = policy_seconds / (passes / best)  # measured time over pure forward time

    search = get_fidelity("search")
    episode_passes = search.images * search.n_p  # every image through its n_p samples
    cache_passes = search.images * (search.n0 + search.n)
    episode_seconds = episode_passes / best * overhead
    return {
        "weights": weights,
        "input": list(shape),
        "device": str(dev),
        "layers": len(layers),
        "depthwise_layers": sum(bool(layer.depthwise) for layer in layers),
        "flops_per_sample": int(flops),
        "limit_samples_per_second": {k: round(v, 1) for k, v in limits.items()},
        "batch_size": bs,
        "samples_per_second": sps,
        "skipped_paths": skipped,
        "fastest_path": best_path,
        "function": paths[best_path].function_id,
        "limit_fraction": round(best / limits[arith], 4) if arith in limits else None,
        "agreement": agreement,
        "calibration_seconds": round(calibration_seconds, 2),
        "reduced": {"images": n_img, "n0": n0, "n": n, "path": best_path,
                    "certify_seconds": round(policy_seconds, 3),
                    "policy_forward_passes": passes,
                    "overhead_over_forward_time": round(overhead, 3)},  # fmt: skip
        "search_extrapolated": {
            "fidelity": {"images": search.images, "n": search.n, "n_p": search.n_p},
            "episode_forward_passes": episode_passes,
            "episode_seconds": round(episode_seconds, 1),
            f"search_{SEARCH_EPISODES}_episodes_hours": round(
                episode_seconds * SEARCH_EPISODES / 3600, 2),
            "fp_cache_forward_passes": cache_passes,
            "fp_cache_hours": round(cache_passes / sps[best_float] / 3600, 2),
            "from": f"{best_path} and {best_float} at {sps[best_path]:.1f} and "
                    f"{sps[best_float]:.1f} samples/s, times the measured overhead {overhead:.2f}",
        },  # fmt: skip
    }


def run_model_bench(archs: list[str], device: str = "cpu", compile: bool = True,
                    gemm_size: int = 2048, quick: bool = False,
                    log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """:func:`model_row` for every architecture of ``archs`` beside one GEMM-peak measurement."""
    from arq_gym.allocator import keep_activation_memory

    say = log or (lambda _m: None)
    unknown = [a for a in archs if a not in INPUT_SHAPES]
    if unknown:
        raise ValueError(f"unknown architecture {unknown[0]!r}; known: {', '.join(INPUT_SHAPES)}")
    keep_activation_memory()
    t_all = time.perf_counter()
    say("measuring GEMM peaks")
    peaks = gemm_peaks(512 if quick else gemm_size)
    kw = {"batches": 1, "reduced": (1, 4, 8), "batch_size": 2} if quick else {}
    rows = {a: model_row(a, peaks, compile=compile and not quick, device=device, say=say, **kw)
            for a in archs}  # fmt: skip
    gpu = "measured: device cuda" if torch.device(device).type == "cuda" else (
        "not measured: no GPU on this machine; run `arq-gym bench-speed --models ... --device "
        "cuda` on one" if not torch.cuda.is_available() else "not measured: pass --device cuda")
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "peak": peaks,
            "models": rows, "gpu": gpu, "seconds": round(time.perf_counter() - t_all, 1)}  # fmt: skip
