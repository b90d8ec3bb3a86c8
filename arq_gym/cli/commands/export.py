"""``arq-gym export``: a quantized network as an ONNX graph with QuantizeLinear /
DequantizeLinear operators (a thin wrapper over :func:`arq_gym.deploy.export_onnx`)."""

from __future__ import annotations

import argparse

from arq_gym.cli import CLIError, command
from arq_gym.cli.commands.certify import add_model_arguments


def _add_export(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument("--policy", default=None, help="arq-policy/1 JSON file to export")
    what.add_argument("--uniform", type=int, default=None, metavar="BITS",
                      help="uniform weight/activation bits (first and last layers at 8)")  # fmt: skip
    add_model_arguments(p, "a base checkpoint (with --policy/--uniform) or a quantized checkpoint "
                           "from `arq-gym finetune`/`nipq` (exported with its own policy)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="MODEL.onnx", help="the ONNX file to write")
    p.add_argument("--check", type=int, default=2000, metavar="N",
                   help="compare ONNX Runtime with the reference on N noisy validation samples "
                        "(default 2,000; 0: skip)")  # fmt: skip
    p.add_argument("--calib-images", type=int, default=512,
                   help="training images that calibrate activation ranges (as in certify)")  # fmt: skip
    p.add_argument("--data-dir", default=None)


@command("export", "export a quantized network to ONNX (QDQ operators, integer weights) for "
                   "ONNX Runtime and other runtimes")(_add_export)  # fmt: skip
def cmd_export(args) -> dict:
    import json

    import torch

    from arq_gym.cli.commands.certify import _load_model
    from arq_gym.cli.commands.finetune import resolve_policy
    from arq_gym.data import DataError, load
    from arq_gym.quant import QuantizedModel, calibration_images, find_layers

    try:
        from arq_gym.deploy import OnnxClassifier, OnnxExportError, agreement, export_onnx
    except ModuleNotFoundError as exc:
        raise CLIError(f"export needs {exc.name}: pip install -e \".[onnx]\"") from None
    if args.calib_images < 1 or args.check < 0:
        raise CLIError("--calib-images must be >= 1 and --check >= 0")
    model, meta = _load_model(args)
    try:
        splits = load(meta["dataset"], args.data_dir)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    calib = calibration_images(splits.train, args.calib_images, seed=0)
    policy = None
    if args.policy or args.uniform is not None:
        policy, _what = resolve_policy(args.policy, args.uniform, find_layers(model, calib[:1]))
    try:
        props = export_onnx(model, meta, policy, calib, args.out)
    except OnnxExportError as exc:
        raise CLIError(str(exc)) from None
    result = {"out": args.out, "format": props["arq.format"],
              "policy": json.loads(props["arq.policy"]), "model": props["arq.model"],
              "dataset": props["arq.dataset"], "sigma": float(props["arq.sigma"]),
              "bops_fraction": float(props["arq.bops_fraction"]),
              "checkpoint_sha256": props["arq.checkpoint_sha256"]}  # fmt: skip
    if args.check:
        reference = QuantizedModel(model, calib, float(meta["sigma"]), seed=0,
                                   quantization=meta.get("quantization"))  # fmt: skip
        reference.apply(OnnxClassifier(args.out).policy)
        val = torch.from_numpy(splits.val.x[:500]).float() / 255.0
        result["check"] = agreement(reference, OnnxClassifier(args.out), val,
                                    float(meta["sigma"]), args.check)  # fmt: skip
    return result
