"""``arq-gym certify``: certify a base model, a policy file or a uniform bit-width.

Full certification runs CERTIFY (Cohen et al.) on the quantized or FP network. With
``--incremental`` the FP network's certification is built once into an IRS cache (reused on
later runs when its metadata matches; shipped caches in ``arq_gym/models/caches`` are looked up
first) and the network is certified incrementally with ``--n-p`` samples per image.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import time
from pathlib import Path

from arq_gym.cli import CLIError, command


def add_model_arguments(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """``--model``, ``--dataset``, ``--sigma`` (a shipped base model) or ``--checkpoint``, as
    :func:`_load_model` reads them (certify, finetune and nipq share them)."""
    p.add_argument("--model", default="resnet20", help="architecture of a shipped base model")
    p.add_argument(
        "--dataset", default=None, help="dataset of the shipped model (default: its own)"
    )
    p.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="noise level of the shipped model (default 0.25; with --checkpoint: its own)",
    )
    p.add_argument("--checkpoint", default=None, help=checkpoint_help)


def _add_certify(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "certify this checkpoint instead of a shipped one")
    p.add_argument("--onnx", default=None, metavar="MODEL.onnx",
                   help="certify a model written by `arq-gym export`, run in ONNX Runtime (its "
                        "metadata gives sigma and dataset; full certification)")  # fmt: skip
    q = p.add_mutually_exclusive_group()
    q.add_argument("--policy", default=None, help="arq-policy/1 JSON file to apply")
    q.add_argument(
        "--uniform",
        type=int,
        default=None,
        metavar="BITS",
        help="uniform weight/activation bits (first/last layer at 8)",
    )
    p.add_argument(
        "--calib-images",
        type=int,
        default=512,
        help="training images used to calibrate activation ranges (quantized runs)",
    )
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument(
        "--images",
        type=int,
        default=500,
        metavar="K",
        help="certify K images, every (len(split)//K)-th (500 of 10,000 = every 20th)",
    )
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="incremental certification (IRS) against a cached FP certificate",
    )
    p.add_argument("--n-p", type=int, default=None, help="IRS samples per image (default n/20)")
    p.add_argument(
        "--n-p-max",
        type=int,
        default=None,
        help="FP predictions kept per image in an IRS cache this run builds (default n); an "
        "existing cache (yours or a shipped one) that keeps at least --n-p is reused",
    )
    p.add_argument(
        "--alpha-zeta", type=float, default=0.001, help="IRS disparity failure probability"
    )
    p.add_argument("--gamma", type=float, default=0.99, help="IRS plain-certification threshold")
    p.add_argument(
        "--cache-dir", default=None, help="IRS cache folder (default: the user cache dir /irs)"
    )
    p.add_argument(
        "--rebuild-cache", action="store_true", help="rebuild the IRS cache even if it fits"
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the per-image TSV here (and a .json summary); a full certification is also "
        "saved every --chunk images in OUT.parts/, and rerunning the same command resumes it",
    )
    p.add_argument("--chunk", type=int, default=25, help="images per saved chunk (default 25)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="noisy samples per forward pass (default 100 on the CPU, where the int8 path runs "
        "about 1.4x faster than at 400 and fp32 as fast; 400 on a GPU); the counts do not depend on it",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--backend",
        choices=("auto", "int8-compiled", "int8", "reference"),
        default="auto",
        help="how a quantized network runs (default auto: int8 integer convolutions under "
        "torch.compile on a CPU that has them, else float32 fake quantization; an FP32 network "
        "runs under torch.compile on a CPU from 100,000 forward passes on, unless reference); "
        "the JSON names the function certified",
    )
    p.add_argument(
        "--compare-full",
        action="store_true",
        help="with --incremental: also certify the same network from scratch with n samples at "
        "alpha + alpha_zeta (equal confidence, fresh noise: seed + 1) and report both results, times and the speed-up",
    )
    p.add_argument(
        "--predict",
        action="store_true",
        help="full mode: also run PREDICT (Cohen et al.) with n samples at alpha on the same "
        "images (its own noise stream) and report its accuracy and abstain rate",
    )
    p.add_argument(
        "--noise-device",
        default="cpu",
        help="where the noise is generated: cpu (same values everywhere) or cuda (faster on a GPU)",
    )
    p.add_argument("--data-dir", default=None, help="folder holding the datasets")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _load_model(args):
    from arq_gym.models import CheckpointError, ZooError, load_checkpoint, load_shipped

    try:
        if args.checkpoint:
            model, meta = load_checkpoint(args.checkpoint)
            if args.sigma is not None and abs(float(meta["sigma"]) - args.sigma) > 1e-12:
                raise CLIError(
                    f"--sigma {args.sigma} differs from the checkpoint's sigma "
                    f"{meta['sigma']}; omit --sigma to use the checkpoint's"
                )
        else:
            sigma = 0.25 if args.sigma is None else args.sigma
            model, meta = load_shipped(args.model, args.dataset, sigma)
    except ZooError as exc:  # the zoo advises the gym.make keyword; say the flag here
        raise CLIError(str(exc.advise("pass --checkpoint PATH to certify your own"))) from exc
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    return model, meta


def _quantize(args, model, sigma: float, splits, device, quantization=None):
    """Wrap the model per --policy/--uniform, or per the policy of a quantized checkpoint
    (``quantization``: its record, :mod:`arq_gym.finetune`); returns
    (model, bops_fraction, description)."""
    from arq_gym.cost import bops_fraction
    from arq_gym.policy import Policy, load_policy
    from arq_gym.quant import QuantizedModel, calibration_images

    if args.calib_images < 1:
        raise CLIError(f"--calib-images must be >= 1, got {args.calib_images}")
    # the same calibration as arq_gym.problem: seeded draw of training images, noise seed 0
    calib = calibration_images(splits.train, args.calib_images, seed=0)
    try:
        qmodel = QuantizedModel(model, calib, sigma, seed=0, quantization=quantization)
    except ValueError as exc:
        raise CLIError(f"checkpoint {args.checkpoint}: {exc}") from exc
    layers = qmodel.layers
    if quantization and (args.policy or args.uniform is not None):
        raise CLIError(f"checkpoint {args.checkpoint} is fine-tuned for its own policy; omit "
                       "--policy/--uniform (or certify its base model with them)")  # fmt: skip
    if quantization:
        policy = qmodel.checkpoint_policy
        desc = "fine-tuned policy of the checkpoint"
    elif args.policy:
        policy, _doc = load_policy(args.policy, layers)
        desc = f"policy {args.policy}"
    else:
        keep = None if args.uniform == 32 else 8
        policy = Policy.uniform(len(layers), args.uniform, keep_first_last=keep)
        desc = f"uniform W{args.uniform}A{args.uniform}"
    qmodel.apply(policy)
    qmodel = qmodel.to(device).eval()
    if device.type == "cpu":
        qmodel.set_backend(args.backend)
        qmodel.warm_up(calib[:1].expand(args.batch_size, *calib.shape[1:]))
    return qmodel, float(bops_fraction(layers, policy)), desc


def _fp32(args, model, images):
    """The FP32 network as certified: compiled on a CPU unless ``--backend reference``
    (:func:`arq_gym.models.compiled.fp32_network`)."""
    from arq_gym.models.compiled import fp32_network

    device = next(model.parameters()).device
    sample = images[:1].expand(args.batch_size, *images.shape[1:]).to(device)
    backend = "reference" if args.backend == "reference" else "auto"
    return fp32_network(model, sample, backend, forward_passes=len(images) * (args.n0 + args.n))


def _onnx_meta(args) -> dict:
    """What ``--onnx FILE`` certifies: sigma, dataset, model and BOPs from the graph's metadata."""
    from arq_gym.deploy import OnnxExportError, read_metadata

    if args.checkpoint or args.policy or args.uniform is not None or args.sigma is not None:
        raise CLIError("--onnx certifies the exported model as it is: drop --checkpoint, "
                       "--policy, --uniform and --sigma")  # fmt: skip
    if args.incremental:
        raise CLIError("--onnx runs full certification (the IRS cache needs the FP32 network, "
                       "which the exported graph does not hold): drop --incremental")  # fmt: skip
    try:
        props = read_metadata(args.onnx)
    except ModuleNotFoundError:
        raise CLIError("--onnx needs ONNX Runtime: pip install -e \".[onnx]\"") from None
    except (OnnxExportError, OSError) as exc:
        raise CLIError(str(exc)) from None
    return {"sigma": float(props["arq.sigma"]), "dataset": props["arq.dataset"],
            "architecture": props["arq.model"], "sha256": props["arq.checkpoint_sha256"],
            "bops_fraction": float(props["arq.bops_fraction"])}  # fmt: skip


def _check_args(args) -> None:
    if args.images < 1:
        raise CLIError(f"--images must be >= 1, got {args.images}")
    if args.chunk < 1:
        raise CLIError(f"--chunk must be >= 1, got {args.chunk}")
    if args.n < 1 or args.n0 < 1:
        raise CLIError("--n and --n0 must be >= 1")
    if args.n0 > args.n:
        raise CLIError(f"--n0 ({args.n0}) must not exceed --n ({args.n})")
    if not 0 < args.alpha < 0.5:
        raise CLIError(f"--alpha must be in (0, 0.5), got {args.alpha}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.n_p is not None and not args.incremental:
        raise CLIError("--n-p only applies with --incremental")
    if args.predict and args.incremental:
        raise CLIError("--predict runs with full certification: drop --incremental")
    if args.compare_full and not args.incremental:
        raise CLIError("--compare-full compares incremental with full certification: add --incremental")
    if args.incremental:
        if args.n_p is None:
            args.n_p = max(1, args.n // 20)
        if args.n_p < 1:
            raise CLIError(f"--n-p must be >= 1, got {args.n_p}")
        n_p_max = args.n if args.n_p_max is None else args.n_p_max
        if args.n_p > n_p_max or n_p_max > args.n:
            raise CLIError(f"need --n-p ({args.n_p}) <= --n-p-max ({n_p_max}) <= --n ({args.n})")
        args.n_p_max = n_p_max


@command(
    "certify",
    "certify a base model, a policy or a uniform bit-width by randomized "
    "smoothing (full or incremental)",
)(_add_certify)
def cmd_certify(args) -> dict:
    import numpy as np
    import torch

    from arq_gym.data import DataError, load
    from arq_gym.files import portable_path
    from arq_gym.smoothing import (
        build_irs_cache,
        certify,
        certify_chunked,
        certify_incremental,
        evenly_spaced,
        find_irs_cache,
        load_or_build_irs_cache,
        predict,
        resolve_device,
    )

    _check_args(args)
    t_all = time.perf_counter()
    device = resolve_device(args.device)
    if args.batch_size is None:
        args.batch_size = 100 if device.type == "cpu" else 400
    if args.onnx:
        model, meta = None, _onnx_meta(args)
    else:
        model, meta = _load_model(args)
    sigma = float(meta["sigma"])
    dataset = meta["dataset"]
    try:
        splits = load(dataset, args.data_dir)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    split = splits.split(args.split)
    if args.images > len(split):
        raise CLIError(
            f"--images {args.images} exceeds the {len(split)} images of the {args.split} split"
        )
    idx = evenly_spaced(len(split), args.images)
    subset = split.subset(idx)
    images = torch.from_numpy(np.ascontiguousarray(subset.x)).float() / 255.0
    labels = subset.y.astype(np.int64)
    if args.onnx:
        from arq_gym.deploy import OnnxClassifier

        net = OnnxClassifier(args.onnx, threads=torch.get_num_threads())
        bops_frac, what = float(meta["bops_fraction"]), f"onnx {Path(args.onnx).name}"
    elif args.policy or args.uniform is not None or meta.get("quantization"):
        model = model.to(device).eval()
        net, bops_frac, what = _quantize(args, model, sigma, splits, device,
                                         meta.get("quantization"))  # fmt: skip
    else:
        model = model.to(device).eval()
        net, bops_frac, what = _fp32(args, model, images), 1.0, "fp32"
    progress = not args.quiet
    result: dict = {
        "model": meta.get("architecture"),
        "dataset": dataset,
        "sigma": sigma,
        "network": what,
        "split": args.split,
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "seed": args.seed,
        "device": str(device),
        "batch_size": args.batch_size,
        "function": getattr(net, "function_id", "fp32"),
        "command": "arq-gym " + shlex.join(getattr(args, "argv", [])),
    }

    if not args.incremental:
        common = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size,
                      seed=args.seed, image_keys=idx, device=device, progress=progress,
                      noise_device=args.noise_device)  # fmt: skip
        if args.out:  # saved every --chunk images beside the output; a rerun resumes
            policy = getattr(net, "policy", None)
            ident = {"checkpoint_sha256": meta["sha256"], "function": result["function"],
                     "w_bits": None if policy is None else list(policy.w_bits),
                     "a_bits": None if policy is None else list(policy.a_bits),
                     "calib_images": args.calib_images, "split": args.split, "sigma": sigma,
                     "n0": args.n0, "n": args.n, "alpha": args.alpha, "seed": args.seed}  # fmt: skip
            cert = certify_chunked(net, images, labels, sigma, parts_dir=f"{args.out}.parts",
                                   ident=ident, chunk=args.chunk, **common)  # fmt: skip
        else:
            cert = certify(net, images, labels, sigma, **common)
        result["mode"] = "full"
        if args.predict:
            t0 = time.perf_counter()
            pred = predict(net, images, sigma, n=args.n, alpha=args.alpha,
                           **{k: v for k, v in common.items() if k not in ("n0", "n", "alpha")})  # fmt: skip
            result["predict"] = {"accuracy": float(np.mean(pred == labels)),
                                 "abstain_rate": float(np.mean(pred == -1)), "n": args.n,
                                 "alpha": args.alpha, "forward_passes": args.n * len(pred),
                                 "seconds": time.perf_counter() - t0}  # fmt: skip
    else:
        from arq_gym.data import user_cache_dir
        from arq_gym.problem import SHIPPED_CACHE_DIR

        expected = {
            "checkpoint_sha256": meta["sha256"],
            "data_sha256": subset.sha256(),
            "sigma": sigma,
            "n0": args.n0,
            "n": args.n,
            "alpha": args.alpha,
            "seed": args.seed,
            "n_p_max": args.n_p,  # a cache that keeps the n_p samples this run uses will do
        }
        cache_dir = Path(args.cache_dir) if args.cache_dir else user_cache_dir() / "irs"
        name = (
            f"{meta.get('architecture')}_{dataset}_s{sigma:g}_{args.split}{args.images}_"
            f"n{args.n}_a{args.alpha:g}_seed{args.seed}_{meta['sha256'][:12]}.npz"
        )
        path = cache_dir / name
        if not args.rebuild_cache and not path.is_file():
            path = find_irs_cache(expected, [SHIPPED_CACHE_DIR]) or path

        def build():
            return build_irs_cache(
                _fp32(args, model, images),
                images,
                labels,
                sigma,
                n0=args.n0,
                n=args.n,
                alpha=args.alpha,
                n_p_max=args.n_p_max,
                seed=args.seed,
                image_keys=idx,
                batch_size=args.batch_size,
                device=device,
                progress=progress,
                checkpoint_sha256=meta["sha256"],
                data_sha256=subset.sha256(),
                noise_device=args.noise_device,
            )

        if args.rebuild_cache:
            cache = build()
            cache.save(path)
        else:
            cache = load_or_build_irs_cache(path, expected, build)
        cert = certify_incremental(
            net,
            images,
            labels,
            cache,
            n_p=args.n_p,
            alpha_zeta=args.alpha_zeta,
            gamma=args.gamma,
            batch_size=args.batch_size,
            device=device,
            progress=progress,
        )
        fp = cache.certificate()
        result |= {
            "mode": "incremental",
            "n_p": args.n_p,
            "alpha_zeta": args.alpha_zeta,
            "gamma": args.gamma,
            "cache": portable_path(path),
            "cache_built": bool(cache.built),
            "cache_seconds": float(cache.meta["seconds"]) if cache.built else 0.0,
            "branches": cert.meta["branches"],
            "fp_acr": fp.acr,
            "fp_clean_accuracy": fp.clean_accuracy,
        }
        if args.compare_full:
            full = certify(
                net, images, labels, sigma, n0=args.n0, n=args.n, alpha=args.alpha + args.alpha_zeta,
                batch_size=args.batch_size, seed=args.seed + 1, image_keys=idx, device=device,
                progress=progress, noise_device=args.noise_device,
            )  # fmt: skip
            result["full"] = full.summary() | {"n": args.n, "alpha": args.alpha + args.alpha_zeta}
            result["speedup"] = full.seconds / max(cert.seconds, 1e-9)
    summary = cert.summary()
    result |= summary | {"bops_fraction": bops_frac, "total_seconds": time.perf_counter() - t_all}
    if args.out:
        out = Path(args.out)
        cert.to_tsv(out)
        extra = {
            k: v for k, v in result.items() if k not in summary and k not in ("sigma", "alpha")
        }
        cert.to_json(out.with_suffix(".json"), **extra)
        result["out"] = str(out)
        shutil.rmtree(f"{args.out}.parts", ignore_errors=True)
    return result
