"""``arq-gym bench-speed``: certification speed on this machine (see :mod:`arq_gym.experiments.bench_speed`)."""

from __future__ import annotations

import argparse
import sys

from arq_gym.cli import CLIError, command


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="test-sized run (seconds, not minutes)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="base model checkpoint (default: the shipped ResNet-20, sigma 0.25)",
    )
    p.add_argument("--threads-only", action="store_true",
                   help="measure only the thread settings (seconds; needs no data)")
    p.add_argument("--no-thread-probe", action="store_true",
                   help="skip the thread settings measurement")  # fmt: skip
    p.add_argument("--images", type=int, default=None, help="images certified (default 100)")
    p.add_argument(
        "--fp-n",
        type=int,
        default=None,
        help="estimation samples of the FP network's IRS cache (default 10,000)",
    )
    p.add_argument("--n-p", type=int, default=None, help="samples per image for IRS (500)")
    p.add_argument(
        "--agreement-samples",
        type=int,
        default=None,
        help="noisy samples compared with the reference (default 100,000)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the int8-compiled path")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--no-onnx", action="store_true",
                   help="skip the ONNX Runtime row (skipped anyway without the [onnx] extra)")  # fmt: skip
    p.add_argument("--models", default=None, metavar="A,B",
                   help="measure these architectures instead (resnet50, mobilenet_v2, "
                        "mobilenet_v2_cifar, resnet20, lenet5): throughput of every path, one "
                        "policy at a reduced setting, the search fidelity extrapolated")  # fmt: skip
    p.add_argument("--device", default="cpu",
                   help="with --models: cpu, or cuda to measure the float paths on a GPU")  # fmt: skip
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None, help="where the FP IRS cache is kept")
    p.add_argument("--no-progress", action="store_true")  # fmt: skip


@command("bench-speed", "measure certification speed: throughput, one policy, naive baseline")(
    _add_bench
)
def cmd_bench_speed(args) -> dict:
    from pathlib import Path

    import torch

    from arq_gym.experiments.bench_speed import (
        BenchConfig,
        quick_config,
        run_bench,
        run_thread_probe,
    )

    # --threads / ARQ_GYM_THREADS are applied by arq_gym.cli.main (args.threads: int or None)
    cfg = quick_config(args.threads) if args.quick else BenchConfig(threads=args.threads)
    for name, attr in (("images", "images"), ("fp_n", "fp_n"), ("n_p", "n_p"),
                       ("agreement_samples", "agreement_samples")):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "agreement_samples" else 1):
                raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")
            setattr(cfg, attr, value)
    if cfg.n_p > cfg.fp_n:
        raise CLIError(f"--n-p ({cfg.n_p}) must not exceed --fp-n ({cfg.fp_n})")
    if args.no_compile:
        cfg.compile = False
    if args.no_naive:
        cfg.naive = False
    if args.no_thread_probe:
        cfg.thread_probe = False
    if args.no_onnx:
        cfg.onnx = False
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CLIError(f"checkpoint {args.checkpoint!r} does not exist")

    def log(msg: str) -> None:
        if not args.no_progress:
            print(f"bench-speed: {msg}", file=sys.stderr, flush=True)

    if args.device != "cpu" and not args.models:
        raise CLIError("--device applies to --models (the ResNet-20 benchmark runs on the CPU)")
    if args.models:
        from arq_gym.experiments.bench_models import run_model_bench

        archs = [a.strip() for a in args.models.split(",") if a.strip()]
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device here")
        try:
            return run_model_bench(archs, device=args.device, compile=not args.no_compile,
                                   quick=args.quick, log=log)  # fmt: skip
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    if args.threads_only:
        if args.no_thread_probe:
            raise CLIError("--threads-only and --no-thread-probe exclude each other")
        return run_thread_probe(cfg, checkpoint=args.checkpoint, log=log)
    return run_bench(cfg, checkpoint=args.checkpoint, data_dir=args.data_dir,
                     cache_dir=None if args.cache_dir is None else Path(args.cache_dir),
                     progress=not args.no_progress, log=log)  # fmt: skip
