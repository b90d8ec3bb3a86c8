"""Speed of certification on this machine: ``arq-gym bench-speed`` (issue 8).

Everything is measured in one run so that ratios are meaningful on a busy machine:

* the machine's GEMM peak for each arithmetic (the best of ``torch.matmul`` fp32 / bf16 and
  ``torch._int_mm`` int8 on square matrices and oneDNN's GEMM as a 1x1 convolution: on the
  project's AMD CPU ``torch.matmul`` reached half of oneDNN's fp32 rate), the network's FLOPs
  per sample (2 x MACs of
  :func:`~arq_gym.quant.find_layers`) and therefore the throughput limit of each arithmetic;
* noisy-sample throughput (samples/s) of the FP network, a uniform W4A4 policy and a mixed
  policy through each execution path: ``fp32-reference`` (the package's definition: eager fp32
  fake quantization, NCHW), ``fp32-channels_last``, ``int8`` (exact integer convolutions,
  eager) and ``int8-compiled`` (the same under ``torch.compile``; for a ResNet also
  ``int8-compiled-unfolded``, without :class:`~arq_gym.quant.FoldedInt8Block`); paths are timed in
  interleaved rounds and the median round is kept;
* where the fastest int8 path spends its time at the best batch size of the sweep
  (``time_breakdown``: the share inside the oneDNN int8 convolution kernel, and that kernel's
  own throughput as a fraction of the int8 GEMM peak, in the network and with each
  convolution run alone on warm caches, the ceiling of ``limit_fraction``; the rest is the
  quantize / batch-norm / residual / ReLU work and the Python around the graph);
* agreement of the fast paths with the reference on noisy samples (top-1 class per sample);
* the time to certify one policy with IRS at fidelity "search" through the fastest path, the
  same through the reference path, and the naive baseline at equal confidence: full CERTIFY of
  the quantized network from scratch (reference path, batch 400, fresh noise, ``n0 = 100``,
  ``n = n_p``, ``alpha + alpha_zeta``) on the same images;
* the thread settings (:func:`thread_probe`): samples/s of the FP network with one thread per
  core and with one thread per process, in one process alone and in ``cores`` processes at
  once (a machine shared with other jobs, or a pool of workers), so that the choice of
  ``ARQ_GYM_THREADS`` / ``--threads`` (:mod:`arq_gym.threads`) rests on a measurement;
* the ONNX Runtime row (:func:`onnx_runtime_row`): the exported W4A4 network
  (:mod:`arq_gym.deploy`) run by ONNX Runtime, its best throughput over the batch sweep against
  the int8 limit and the int8-compiled path, and its agreement with the reference.

The IRS cache of the FP network is built (once, kept in the user cache directory) with
``fp_n`` estimation samples; ``n = 10,000`` as in the search fidelity takes a million forward
passes, so ``--fp-n`` can lower it for a quicker benchmark (the branch mix then differs a little
from a real search: a smaller ``n`` gives lower ``pA_lower``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from arq_gym.allocator import keep_activation_memory
from arq_gym.policy import Policy

PATHS = ("fp32-reference", "fp32-channels_last", "int8", "int8-compiled",
         "int8-compiled-unfolded")  # fmt: skip


@dataclass
class BenchConfig:
    """Sizes of one benchmark run (:func:`quick_config` for a test-sized one)."""

    images: int = 100  # fidelity "search"
    n_p: int = 500
    fp_n: int = 10_000
    n0: int = 100
    alpha: float = 0.001
    alpha_zeta: float = 0.001
    gamma: float = 0.99
    batch_size: int = 100  # the best of the sweep on 2 CPU cores (cache-resident activations)
    throughput_batches: int = 5
    agreement_samples: int = 100_000
    gemm_size: int = 2048
    calibration_images: int = 512
    calibration: str = "mse"
    compile: bool = True
    naive: bool = True
    reference_irs: bool = True
    batch_sizes: tuple[int, ...] = (50, 100, 200, 400)
    threads: int | None = None  # None: the process's setting (arq_gym.threads)
    thread_probe: bool = True
    thread_probe_seconds: float = 2.0  # per measurement
    thread_probe_rounds: int = 3
    onnx: bool = True  # the ONNX Runtime row (needs the [onnx] extra; skipped without it)
    seed: int = 0


def quick_config(threads: int | None = None) -> BenchConfig:
    """A configuration that runs in well under a minute (for tests and smoke checks)."""
    return BenchConfig(images=4, n_p=50, fp_n=100, n0=20, batch_size=100, throughput_batches=2,
                       agreement_samples=400, gemm_size=512, calibration_images=32,
                       calibration="max", compile=False, batch_sizes=(), threads=threads,
                       thread_probe_seconds=0.5, thread_probe_rounds=1)  # fmt: skip


def mixed_policy(num_layers: int, seed: int = 0) -> Policy:
    """A fixed mixed-precision policy: first and last layers 8/8, others 2..8 bits at random."""
    rng = np.random.default_rng(seed)
    w = [int(b) for b in rng.integers(2, 9, num_layers)]
    a = [int(b) for b in rng.integers(2, 9, num_layers)]
    w[0] = a[0] = w[-1] = a[-1] = 8
    return Policy(tuple(w), tuple(a))


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _conv1x1_gemms(rows: int, channels: int, gen: torch.Generator) -> dict[str, Callable]:
    """GEMMs of ``rows x channels x channels`` as 1x1 convolutions in channels_last: oneDNN's
    kernels, which this CPU runs faster than ``torch.matmul``'s for fp32 (MKL)."""
    side = 16
    batch = max(1, rows // (side * side))
    x = torch.randn(batch, channels, side, side, generator=gen).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 1, 1, generator=gen)
    xb, wb = x.bfloat16(), w.bfloat16()
    ops = {"fp32": lambda: torch.nn.functional.conv2d(x, w),
           "bf16": lambda: torch.nn.functional.conv2d(xb, wb)}  # fmt: skip
    from arq_gym.quant import int8_kernels_available

    if int8_kernels_available():
        qw = torch.randint(-127, 128, (channels, channels, 1, 1), dtype=torch.int8, generator=gen)
        scale, zp = torch.full((channels,), 0.01), torch.zeros(channels, dtype=torch.int64)
        packed = torch.ops.onednn.qconv_prepack(
            qw.contiguous(memory_format=torch.channels_last), scale, 0.05, 0, [1, 1], [0, 0],
            [1, 1], 1, None)  # fmt: skip
        qx = torch.randint(0, 256, tuple(x.shape), dtype=torch.uint8, generator=gen).contiguous(
            memory_format=torch.channels_last)
        ops["int8"] = lambda: torch.ops.onednn.qconv2d_pointwise(
            qx, 0.05, 0, packed, scale, zp, None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
            torch.float32, "none", [], "")  # fmt: skip
    return ops


def gemm_peaks(size: int = 2048, reps: int = 5) -> dict:
    """The machine's measured GEMM peak per arithmetic (GFLOP/s; int8 in GOP/s): the best of
    ``torch.matmul`` (fp32, bf16) and ``torch._int_mm`` (int8) on ``size x size`` matrices and
    of oneDNN's GEMM as a 1x1 convolution (``4 * size`` rows, 256 channels), best of ``reps``
    interleaved rounds. ``<arith>_gflops_by_kernel`` keeps each kernel's figure."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    square = 2.0 * size**3
    ops: dict[tuple[str, str], tuple[Callable, float]] = {
        ("fp32", "matmul"): (lambda: torch.matmul(a, b), square),
        ("bf16", "matmul"): (lambda: torch.matmul(a16, b16), square),
    }
    if hasattr(torch, "_int_mm"):
        ai = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=gen)
        bi = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=gen)
        ops[("int8", "int_mm")] = (lambda: torch._int_mm(ai, bi), square)
    rows, channels = 4 * size, 256
    rows -= rows % 256
    for arith, fn in _conv1x1_gemms(rows, channels, gen).items():
        ops[(arith, "onednn_conv1x1")] = (fn, 2.0 * rows * channels * channels)
    best = {k: 0.0 for k in ops}
    for k, (fn, _) in ops.items():
        try:
            fn()
        except RuntimeError:
            best.pop(k)
    for _ in range(reps):  # interleaved rounds
        for k in best:
            fn, flops = ops[k]
            best[k] = max(best[k], flops / _time(fn) / 1e9)
    out: dict = {}
    for (arith, kernel), v in best.items():
        out[f"{arith}_gflops"] = round(max(out.get(f"{arith}_gflops", 0.0), v), 2)
        out.setdefault(f"{arith}_gflops_by_kernel", {})[kernel] = round(v, 2)
    return out


def throughput_limits(peaks: dict, flops_per_sample: float) -> dict[str, float]:
    """Samples/s each arithmetic's measured GEMM peak (:func:`gemm_peaks`) allows a network of
    ``flops_per_sample``: ``{"fp32": ..., "bf16": ..., "int8": ...}``."""
    return {k.split("_")[0]: v * 1e9 / flops_per_sample for k, v in peaks.items()
            if k.endswith("_gflops")}  # fmt: skip


def time_breakdown(qm, batch: torch.Tensor, rounds: int = 3) -> dict:
    """Where the forward time of ``qm`` goes (``torch.profiler``, ``rounds`` passes of
    ``batch``): the share spent inside the oneDNN int8 convolution kernel and its seconds per
    pass; the rest is the quantization, batch norm, residual and ReLU work around it."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        qm(batch)
        with _quiet_kineto(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                qm(batch)
    events = prof.key_averages()
    conv_us = sum(e.self_cpu_time_total for e in events if e.key == "onednn::qconv2d_pointwise")
    total_us = sum(e.self_cpu_time_total for e in events)
    return {"int8_conv_share": conv_us / total_us if total_us else 0.0,
            "int8_conv_seconds_per_batch": conv_us / 1e6 / rounds,
            "int8_conv_alone_seconds_per_batch": convolutions_alone(qm, batch)}  # fmt: skip


@contextlib.contextmanager
def _quiet_kineto():
    """Keep the profiler's backend (kineto) from printing ``USDT: ... profiler_start`` and
    ``profiler_stop`` lines on stderr: kineto reads ``KINETO_LOG_LEVEL`` when a profile
    starts, and its USDT messages are level 5, so 6 silences them. A level the user set is
    kept."""
    user = os.environ.get("KINETO_LOG_LEVEL")
    if user is None:
        os.environ["KINETO_LOG_LEVEL"] = "6"
    try:
        yield
    finally:
        if user is None:
            os.environ.pop("KINETO_LOG_LEVEL", None)


def convolutions_alone(qm, batch: torch.Tensor, repeats: int = 5) -> float:
    """Seconds per pass of ``batch`` that ``qm``'s int8 convolutions take when each runs by
    itself, repeated on its own input (median of ``repeats``), so that its input, weights and
    output stay in cache: the best these kernels do on the network's layer shapes, against
    which the in-network time shows what memory traffic between layers costs."""
    from arq_gym.quant import Int8Conv2d

    calls: list[tuple[Callable, torch.Tensor]] = []
    layers = [m for m in qm.modules() if isinstance(m, Int8Conv2d)]

    def recorder(layer: Int8Conv2d, name: str):
        method = getattr(layer, name)

        def record(codes: torch.Tensor) -> torch.Tensor:
            calls.append((method, codes))
            return method(codes)

        return record

    for layer in layers:  # instance attributes shadow the methods the int8 ops call
        layer.conv_codes = recorder(layer, "conv_codes")
        layer.conv_codes_folded = recorder(layer, "conv_codes_folded")
    try:
        with torch.inference_mode():
            qm(batch)
    finally:
        for layer in layers:
            del layer.conv_codes, layer.conv_codes_folded
    total = 0.0
    with torch.inference_mode():
        for method, codes in calls:
            method(codes)
            total += statistics.median(_time(lambda m=method, c=codes: m(c)) for _ in range(repeats))
    return total


def _noisy_batches(images: torch.Tensor, sigma: float, batch: int, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        idx = torch.randint(len(images), (batch,), generator=gen)
        out.append(images[idx] + sigma * torch.randn((batch, *images.shape[1:]), generator=gen))
    return out


def _throughputs(runners: dict[str, Callable], batches: list[torch.Tensor]) -> dict[str, float]:
    """samples/s of each runner: interleaved rounds over the batches, median round."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for fn in runners.values():  # warm-up
            fn(batches[0])
        for x in batches:
            for k, fn in runners.items():
                times[k].append(len(x) / _time(lambda fn=fn, x=x: fn(x)))
    return {k: round(statistics.median(v), 1) for k, v in times.items()}


def _load_model(checkpoint: str | None):
    from arq_gym.models import ZooError, build, load_checkpoint, load_shipped

    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint)
        return model, meta, f"checkpoint {os.path.basename(checkpoint)}"
    try:
        model, meta = load_shipped("resnet20", sigma=0.25)
        return model, meta, "shipped resnet20 sigma 0.25"
    except (ZooError, FileNotFoundError, ValueError):
        torch.manual_seed(0)
        model = build("resnet20").eval()
        meta = {"architecture": "resnet20", "dataset": "cifar10", "sigma": 0.25, "sha256": ""}
        return model, meta, "resnet20 random init (no shipped weights yet)"


def _probe_worker(rank: int, model: torch.nn.Module, shape: tuple[int, ...], batch: int,
                  settings: tuple[int, ...], seconds: float, rounds: int, barrier,
                  queue) -> None:  # fmt: skip
    """One process of :func:`thread_probe`: for each round and thread setting, a phase with
    process 0 alone and a phase with every process at once; puts ``(round, threads, phase,
    rank, samples/s)`` on ``queue``. The barrier lines the phases up across processes."""
    try:
        torch.manual_seed(rank)
        x = torch.randn(batch, *shape)
        with torch.inference_mode():
            for r in range(rounds):
                for t in settings:
                    torch.set_num_threads(t)  # a spawned process: any count is safe
                    model(x)  # warm-up at this count
                    for phase in ("alone", "concurrent"):
                        barrier.wait()
                        if phase == "concurrent" or rank == 0:
                            count, t0 = 0, time.perf_counter()
                            while (elapsed := time.perf_counter() - t0) < seconds:
                                model(x)
                                count += batch
                            queue.put((r, t, phase, rank, count / elapsed))
                        barrier.wait()
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        barrier.abort()


def thread_probe(model: torch.nn.Module, shape: tuple[int, ...], batch: int = 100,
                 seconds: float = 2.0, rounds: int = 3, processes: int | None = None,
                 settings: tuple[int, ...] | None = None) -> dict:  # fmt: skip
    """Samples/s of ``model`` (fp32, eager, batches of ``batch`` noise images of ``shape``)
    under each torch thread ``settings`` (default: one per core, and 1), measured in one run:

    * ``one_process``: one process alone (the idle-machine case);
    * ``concurrent``: the total of ``processes`` (default: one per core) processes running at
      once (a shared machine, or a worker pool), and ``per_process``, its share.

    The processes are spawned (fresh interpreters, so any thread count is safe) and kept for
    every phase; phases are interleaved per round and the median round is reported. ``best``
    names the setting with the highest concurrent total, the one to use on a busy machine."""
    import multiprocessing as mp

    from arq_gym.threads import configured_threads, cores

    ncores = cores()
    procs = int(processes or ncores)
    if settings is None:
        wanted = [ncores, 1, configured_threads() or 1]
        settings = tuple(sorted(set(wanted), reverse=True))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    model = copy.deepcopy(model).float().eval()
    workers = [ctx.Process(target=_probe_worker, daemon=True,
                           args=(rank, model, tuple(shape), batch, tuple(settings), seconds,
                                 rounds, barrier, queue))  # fmt: skip
               for rank in range(procs)]  # fmt: skip
    for w in workers:
        w.start()
    expected = rounds * len(settings) * (1 + procs)
    rows = []
    try:
        while len(rows) < expected:
            try:
                row = queue.get(timeout=120 + 4 * seconds)
            except Exception as exc:  # queue.Empty: a worker died
                raise RuntimeError("thread probe: a worker stopped answering") from exc
            if row[0] == "error":
                raise RuntimeError(f"thread probe: {row[1]}")
            rows.append(row)
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
    one: dict[str, float] = {}
    total: dict[str, float] = {}
    for t in settings:
        alone = [v for r_, t_, ph, _rk, v in rows if t_ == t and ph == "alone"]
        sums = [sum(v for r_, t_, ph, _rk, v in rows if t_ == t and ph == "concurrent" and r_ == r)
                for r in range(rounds)]  # fmt: skip
        one[str(t)] = round(statistics.median(alone), 1)
        total[str(t)] = round(statistics.median(sums), 1)
    best = max(total, key=total.get)
    return {"cores": ncores, "processes": procs, "batch": batch, "seconds": seconds,
            "rounds": rounds, "workload": "fp32 eager forward of the base network",
            "one_process": one, "concurrent": total,
            "per_process": {k: round(v / procs, 1) for k, v in total.items()},
            "best": int(best)}  # fmt: skip


def model_input_shape(meta: dict) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images of the checkpoint's dataset (CIFAR-10 when unknown)."""
    from arq_gym.data import DATASETS

    info = DATASETS.get(meta.get("dataset") or "cifar10") or DATASETS["cifar10"]
    return tuple(info.shape)


def run_thread_probe(cfg: BenchConfig, checkpoint: str | None = None,
                     log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Only the thread-setting measurement of :func:`thread_probe` (no data needed)."""
    model, meta, model_desc = _load_model(checkpoint)
    if log:
        log("thread settings: one process and one per core, one thread per core and one each")
    t0 = time.perf_counter()
    probe = thread_probe(model, model_input_shape(meta), batch=cfg.batch_size,
                         seconds=cfg.thread_probe_seconds, rounds=cfg.thread_probe_rounds)  # fmt: skip
    return {"model": model_desc, "torch": torch.__version__, "thread_settings": probe,
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def run_bench(cfg: BenchConfig, checkpoint: str | None = None, data_dir=None,
              cache_dir=None, progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Run the benchmark described in the module docstring; returns the JSON-ready result."""
    from arq_gym import data as data_mod
    from arq_gym.fidelity import get_fidelity
    from arq_gym.problem import SHIPPED_CACHE_DIR
    from arq_gym.quant import (
        QuantizedModel,
        calibration_images,
        check_int8_kernel,
        uniform_policy,
    )
    from arq_gym.smoothing import certify, certify_incremental
    from arq_gym.smoothing.incremental import (
        build_irs_cache,
        find_irs_cache,
        load_or_build_irs_cache,
    )
    from arq_gym.threads import set_threads

    say = log or (lambda _m: None)
    if cfg.threads is not None:
        set_threads(cfg.threads)
    threads = torch.get_num_threads()
    keep_activation_memory()  # as every certification does (arq_gym.allocator)
    t_all = time.perf_counter()
    model, meta, model_desc = _load_model(checkpoint)
    sigma = float(meta.get("sigma", 0.25))
    splits = data_mod.load(meta.get("dataset", "cifar10"), data_dir=data_dir)
    fid = get_fidelity("search", images=cfg.images, n=cfg.fp_n, n_p=cfg.n_p)
    split = splits.split(fid.split)
    keys = fid.subset_indices(len(split))
    subset = split.subset(keys)
    images = torch.from_numpy(np.ascontiguousarray(subset.x)).float().div_(255.0)
    labels = np.asarray(subset.y, dtype=np.int64)

    say("calibrating the quantized model")
    calib = calibration_images(splits.train, cfg.calibration_images, seed=0)
    t0 = time.perf_counter()
    qref = QuantizedModel(model, calib, sigma, calibration=cfg.calibration, seed=0)
    calibration_seconds = time.perf_counter() - t0
    layers = qref.layers
    w4a4 = uniform_policy(layers, 4)
    mixed = mixed_policy(len(layers))
    policies = {"fp": Policy.uniform(len(layers), 32, None), "w4a4": w4a4, "mixed": mixed}
    flops = 2 * sum(layer.macs for layer in layers)

    int8_ok = check_int8_kernel()
    qcl = copy.deepcopy(qref)
    qcl.model.to(memory_format=torch.channels_last)
    paths: dict[str, QuantizedModel] = {"fp32-reference": qref, "fp32-channels_last": qcl}
    skipped: dict[str, str] = {}
    compile_seconds = None
    if int8_ok:
        paths["int8"] = copy.deepcopy(qref).set_backend("int8")
        if cfg.compile:
            qc = copy.deepcopy(qref).set_backend("int8-compiled").apply(w4a4)
            say("compiling the int8 model (torch.compile)")
            warm = _noisy_batches(images, sigma, cfg.batch_size, 1, 99)[0]
            t0 = time.perf_counter()
            qc.warm_up(warm)
            compile_seconds = time.perf_counter() - t0
            paths["int8-compiled"] = qc
            if qc.function_id.startswith("int8-exact-sums-folded"):  # ResNet: folding's gain
                qu = copy.deepcopy(qref).set_backend("int8-compiled").set_folding(False)
                paths["int8-compiled-unfolded"] = qu.apply(w4a4).warm_up(warm)
        else:
            skipped["int8-compiled"] = "compile disabled (--quick or --no-compile)"
    else:
        for p in ("int8", "int8-compiled"):
            skipped[p] = "no exact oneDNN int8 convolution on this torch/CPU"

    say("measuring GEMM peaks")
    peaks = gemm_peaks(cfg.gemm_size)

    say("measuring throughput")
    batches = _noisy_batches(images, sigma, cfg.batch_size, cfg.throughput_batches, cfg.seed)
    sps: dict[str, dict[str, float]] = {p: {} for p in paths}
    for pname, pol in policies.items():
        runners = {}
        for path, qm in paths.items():
            if pname == "fp" and path.startswith("int8-compiled"):
                continue  # float layers would change the compiled graph; fp runs eager
            qm.apply(pol)
            if path == "fp32-channels_last":
                runners[path] = lambda x, qm=qm: qm(x.contiguous(memory_format=torch.channels_last))
            else:
                runners[path] = qm
        for path, v in _throughputs(runners, batches).items():
            sps[path][pname] = v
    for qm in paths.values():
        qm.apply(w4a4)

    fastest = max((p for p in paths if p != "fp32-channels_last"),
                  key=lambda p: sps[p].get("w4a4", 0.0))  # fmt: skip
    batch_sweep = {}
    if cfg.batch_sizes:
        say(f"batch-size sweep on {fastest}")
        qm = paths[fastest]
        for bs in cfg.batch_sizes:
            bb = _noisy_batches(images, sigma, bs, max(2, cfg.throughput_batches // 2), 7)
            batch_sweep[str(bs)] = _throughputs({fastest: qm}, bb)[fastest]

    # agreement of each fast path with the reference (top-1 class on noisy samples)
    say(f"agreement on {cfg.agreement_samples} noisy samples")
    agreement = {}
    fast_paths = [p for p in paths if p != "fp32-reference"]
    if cfg.agreement_samples > 0 and fast_paths:
        bs = cfg.batch_size
        nb = max(1, -(-cfg.agreement_samples // bs))
        dis = {p: 0 for p in fast_paths}
        maxdiff = {p: 0.0 for p in fast_paths}
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.inference_mode():
            for b in range(nb):
                pol = (w4a4, mixed)[b % 2]
                idx = torch.randint(len(images), (bs,), generator=gen)
                x = images[idx] + sigma * torch.randn((bs, *images.shape[1:]), generator=gen)
                ref = qref.apply(pol)(x)
                for p in fast_paths:
                    out = paths[p].apply(pol)(x)
                    dis[p] += int((out.argmax(1) != ref.argmax(1)).sum())
                    maxdiff[p] = max(maxdiff[p], float((out - ref).abs().max()))
        for p in fast_paths:
            agreement[p] = {"samples": nb * bs, "disagreements": dis[p],
                            "max_abs_logit_diff": maxdiff[p],
                            "policies": ["w4a4", "mixed"]}  # fmt: skip
        for qm in paths.values():
            qm.apply(w4a4)

    # one policy at fidelity search: fastest path, reference IRS, naive CERTIFY
    say(f"IRS cache of the FP network ({cfg.images} images, n={cfg.fp_n})")
    from arq_gym.data import user_cache_dir

    cache_root = (cache_dir or (user_cache_dir() / "bench")).__fspath__()
    expected = {"checkpoint_sha256": meta.get("sha256", ""), "data_sha256": subset.sha256(),
                "sigma": sigma, "n0": cfg.n0, "n": cfg.fp_n, "alpha": cfg.alpha,
                "seed": cfg.seed, "n_p_max": cfg.n_p}  # fmt: skip
    fname = f"{(meta.get('sha256') or 'random')[:16]}_i{cfg.images}_n{cfg.fp_n}_np{cfg.n_p}.npz"
    t0 = time.perf_counter()

    def build():
        return build_irs_cache(model, images, labels, sigma, n0=cfg.n0, n=cfg.fp_n,
                               alpha=cfg.alpha, n_p_max=cfg.n_p, seed=cfg.seed,
                               image_keys=keys, batch_size=400, progress=progress,
                               checkpoint_sha256=meta.get("sha256", ""),
                               data_sha256=subset.sha256())  # fmt: skip

    if meta.get("sha256"):
        # the shipped search-fidelity cache serves when the settings are the defaults
        path = find_irs_cache(expected, [SHIPPED_CACHE_DIR]) or os.path.join(cache_root, fname)
        cache = load_or_build_irs_cache(path, expected, build)
    else:  # random init: nothing stable to key a file on
        cache = build()
    cache_seconds = time.perf_counter() - t0
    irs_kw = dict(n_p=cfg.n_p, alpha_zeta=cfg.alpha_zeta, gamma=cfg.gamma, progress=progress)

    def irs(qm: QuantizedModel, bs: int):
        t0 = time.perf_counter()
        qm.apply(mixed)
        with torch.inference_mode():
            cert = certify_incremental(qm, images, labels, cache, batch_size=bs, **irs_kw)
        return cert, time.perf_counter() - t0

    for qm in paths.values():  # the evaluated policy must not be the one applied already
        qm.apply(w4a4)
    best_bs = int(max(batch_sweep, key=batch_sweep.get)) if batch_sweep else cfg.batch_size
    say(f"IRS of one policy through {fastest} (batch {best_bs})")
    cert_fast, policy_seconds = irs(paths[fastest], best_bs)
    result_irs_ref = None
    if cfg.reference_irs:
        say("IRS of the same policy through fp32-reference")
        cert_ref, ref_seconds = irs(qref, 400)
        same = (np.array_equal(cert_ref.predict, cert_fast.predict)
                and np.allclose(cert_ref.radius, cert_fast.radius, rtol=0, atol=0))  # fmt: skip
        result_irs_ref = {"seconds": round(ref_seconds, 3), "acr": float(cert_ref.acr),
                          "identical_certificate": bool(same),
                          "images_with_other_radius": int(
                              (cert_ref.radius != cert_fast.radius).sum())}  # fmt: skip
    naive_seconds = None
    naive = None
    if cfg.naive:
        say("naive baseline: CERTIFY from scratch, reference path, fresh noise")
        qref.apply(mixed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            cert_naive = certify(
                qref,
                images,
                labels,
                sigma,
                n0=cfg.n0,
                n=cfg.n_p,
                alpha=cfg.alpha + cfg.alpha_zeta,
                batch_size=400,
                seed=cfg.seed + 1000,
                image_keys=keys,
                progress=progress,
            )
        naive_seconds = time.perf_counter() - t0
        naive = {"seconds": round(naive_seconds, 4), "acr": float(cert_naive.acr),
                 "forward_passes": int(cert_naive.forward_passes)}  # fmt: skip

    limits = throughput_limits(peaks, flops)
    arith = {"fp32-reference": "fp32", "fp32-channels_last": "fp32", "int8": "int8",
             "int8-compiled": "int8", "int8-compiled-unfolded": "int8"}  # fmt: skip
    best_q = max(sps, key=lambda p: sps[p].get("w4a4", 0.0))
    best_rate = max(sps[best_q].get("w4a4", 0.0), sps[best_q].get("mixed", 0.0))
    if batch_sweep and best_q == fastest:  # the best batch size counts (W4A4 in the sweep)
        best_rate = max(best_rate, *batch_sweep.values())
    best_limit = limits.get(arith[best_q], limits.get("fp32"))
    breakdown = None
    int8_path = next((p for p in ("int8-compiled", "int8") if p in paths), None)
    if int8_path is not None and "int8_gflops" in peaks:
        say(f"time breakdown of {int8_path}")
        qm = paths[int8_path].apply(w4a4)
        xb = _noisy_batches(images, sigma, best_bs, 1, 11)[0]  # at the best batch size
        breakdown = time_breakdown(qm, xb) | {"path": int8_path, "policy": "w4a4",
                                              "batch": best_bs}  # fmt: skip
        conv_flops = 2 * sum(lay.macs for lay in layers if lay.kind == "conv") * best_bs
        # the convolutions against the same GEMM peak, in the network and alone
        for where in ("", "_alone"):
            sec = breakdown[f"int8_conv{where}_seconds_per_batch"]
            breakdown[f"int8_conv{where}_limit_fraction"] = (
                round(conv_flops / sec / (peaks["int8_gflops"] * 1e9), 4) if sec else None)  # fmt: skip
    onnx_row = None
    if cfg.onnx:
        say("ONNX Runtime: export W4A4 and the mixed policy, throughput and agreement")
        onnx_row = onnx_runtime_row(model, meta, calib, images, sigma, w4a4, mixed, qref, cfg,
                                    limits.get("int8"), sps.get("int8-compiled", {}).get("w4a4"),
                                    batch_sweep)  # fmt: skip
    thread_settings = None
    if cfg.thread_probe:
        say("thread settings: one process and one per core, one thread per core and one each")
        thread_settings = thread_probe(model, tuple(images.shape[1:]), batch=cfg.batch_size,
                                       seconds=cfg.thread_probe_seconds,
                                       rounds=cfg.thread_probe_rounds)  # fmt: skip
    return {
        "model": model_desc,
        "checkpoint_sha256": meta.get("sha256", ""),
        "threads": int(threads),
        "torch": torch.__version__,
        "flops_per_sample": int(flops),
        "peak": peaks,
        "limit_samples_per_second": {k: round(v, 1) for k, v in limits.items()},
        "samples_per_second": sps,
        "skipped_paths": skipped,
        "batch_size": cfg.batch_size,
        "batch_sweep": {"path": fastest, "samples_per_second": batch_sweep},
        "compile_seconds": None if compile_seconds is None else round(compile_seconds, 2),
        "calibration_seconds": round(calibration_seconds, 2),
        "agreement": agreement,
        "fastest_path": fastest,
        "limit_path": best_q,
        "limit_fraction": round(best_rate / best_limit, 4) if best_limit else None,
        "time_breakdown": breakdown,
        "fidelity": {
            "images": cfg.images,
            "fp_n": cfg.fp_n,
            "n_p": cfg.n_p,
            "n0": cfg.n0,
            "alpha": cfg.alpha,
            "alpha_zeta": cfg.alpha_zeta,
            "gamma": cfg.gamma,
        },
        "irs_cache_seconds": round(cache_seconds, 2),
        "policy": {"w_bits": list(mixed.w_bits), "a_bits": list(mixed.a_bits)},
        "policy_seconds": round(policy_seconds, 4),
        "policy_forward_passes": int(cert_fast.forward_passes),
        "policy_branches": cert_fast.meta.get("branches", {}),
        "policy_acr": float(cert_fast.acr),
        "policy_function": paths[fastest].function_id,
        "reference_irs": result_irs_ref,
        "naive": naive,
        "naive_seconds": None if naive_seconds is None else round(naive_seconds, 4),
        "speedup": None if naive_seconds is None else round(naive_seconds / policy_seconds, 2),
        "thread_settings": thread_settings,
        "onnxruntime": onnx_row,
        "seconds": round(time.perf_counter() - t_all, 1),
    }


def onnx_runtime_row(model, meta, calib, images, sigma, w4a4, mixed, qref, cfg, int8_limit,
                     int8_compiled_sps, int8_sweep) -> dict:  # fmt: skip
    """The ONNX Runtime row (``arq-gym export`` + :class:`arq_gym.deploy.OnnxClassifier`):
    W4A4 throughput at each batch size of the sweep, the best against the int8 limit and the
    int8-compiled path, and agreement with the reference on noisy samples (W4A4 and mixed)."""
    import tempfile

    try:
        from arq_gym.deploy import OnnxClassifier, export_onnx
    except ModuleNotFoundError as exc:
        return {"skipped": f"{exc.name} is not installed: pip install -e \".[onnx]\""}
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = {}
        for name, pol in (("w4a4", w4a4), ("mixed", mixed)):
            export_onnx(model, meta, pol, calib, f"{tmp}/{name}.onnx",
                        calibration=cfg.calibration)  # fmt: skip
            runtimes[name] = OnnxClassifier(f"{tmp}/{name}.onnx")
        sizes = [int(b) for b in (cfg.batch_sizes or [cfg.batch_size])]
        sweep = {}
        for bs in sizes:
            bb = _noisy_batches(images, sigma, bs, max(2, cfg.throughput_batches // 2), 7)
            sweep[str(bs)] = _throughputs({"onnx": runtimes["w4a4"]}, bb)["onnx"]
        best_bs = max(sweep, key=sweep.get)
        dis, maxdiff, done = 0, 0.0, 0
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.inference_mode():
            b = 0
            while done < cfg.agreement_samples:
                name, pol = (("w4a4", w4a4), ("mixed", mixed))[b % 2]
                take = min(cfg.batch_size, cfg.agreement_samples - done)
                idx = torch.randint(len(images), (take,), generator=gen)
                x = images[idx] + sigma * torch.randn((take, *images.shape[1:]), generator=gen)
                ref = qref.apply(pol)(x)
                out = runtimes[name](x)
                dis += int((out.argmax(1) != ref.argmax(1)).sum())
                maxdiff = max(maxdiff, float((out - ref).abs().max()))
                done += take
                b += 1
        qref.apply(w4a4)
        best = sweep[best_bs]
        int8_best = max([int8_compiled_sps or 0.0, *(int8_sweep or {}).values()])
        return {
            "function": runtimes["w4a4"].function_id,
            "threads": runtimes["w4a4"].session.get_session_options().intra_op_num_threads,
            "samples_per_second_by_batch": sweep,
            "best_batch": int(best_bs),
            "best_samples_per_second": round(best, 1),
            "limit_fraction": round(best / int8_limit, 4) if int8_limit else None,
            "int8_compiled_best_samples_per_second": round(int8_best, 1) if int8_best else None,
            "speed_vs_int8_compiled": round(best / int8_best, 3) if int8_best else None,
            "agreement": {"samples": done, "disagreements": dis, "max_abs_logit_diff": maxdiff,
                          "policies": ["w4a4", "mixed"]},  # fmt: skip
        }
