"""``arq-gym train``: train a base model with Gaussian noise augmentation (:mod:`arq_gym.train`)."""

from __future__ import annotations

from arq_gym.cli import command


def _add_train(p):
    p.add_argument("--model", default="resnet20", help="architecture: resnet20/32/44/56, "
                   "mobilenet_v2_cifar (CIFAR-10), lenet5 (Fashion-MNIST)")
    p.add_argument("--dataset", default=None, help="cifar10 or fashion_mnist (default: the model's)")
    p.add_argument("--sigma", type=float, default=0.25, help="Gaussian noise std in [0,1] pixels")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="train in plain fp32")
    p.add_argument("--out", required=True, help="checkpoint path to write")
    p.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--log-dir", default=None, help="TensorBoard folder (default: OUT.tb)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-images", type=int, default=None, help="use only K training images")
    p.add_argument("--consistency", type=float, default=0.0, metavar="LAMBDA",
                   help="consistency regulariser across noisy copies (Jeong and Shin 2020; they "
                        "use 10 at sigma 0.25, 20 at 0.5 and 1.0 with m = 2); 0: plain noise")  # fmt: skip
    p.add_argument("--noise-copies", type=int, default=2, metavar="M",
                   help="noisy copies of each image with --consistency (default 2)")
    p.add_argument("--consistency-eta", type=float, default=0.5,
                   help="weight of the mean prediction's entropy with --consistency (0.5)")
    p.add_argument("--swa-epochs", type=int, default=0, metavar="K",
                   help="stochastic weight averaging over the last K epochs, at --swa-lr; the "
                        "average (batch norm recomputed under noise) is the checkpoint")  # fmt: skip
    p.add_argument("--swa-lr", type=float, default=0.01, help="constant lr of the SWA epochs (0.01)")
    p.add_argument("--teacher", action="append", default=[], metavar="CKPT",
                   help="distil from this checkpoint (same dataset and sigma, any architecture); "
                        "repeat for an ensemble, whose softmax outputs are averaged")  # fmt: skip
    p.add_argument("--distill", type=float, default=None, metavar="ALPHA",
                   help="weight of the distillation term in (0, 1] (default 0.5 with --teacher)")
    p.add_argument("--distill-temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature of the distillation term (default 1)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="warm start from this checkpoint (same model, dataset, sigma); a fresh "
                        "cosine schedule of --epochs follows")
    p.add_argument("--init-other-sigma", action="store_true",
                   help="let --init start from a model of another sigma (a noise curriculum)")


@command("train", "train a base model with Gaussian noise augmentation")(_add_train)
def cmd_train(args) -> dict:
    from arq_gym.train import TrainConfig, train

    cfg = TrainConfig(model=args.model, dataset=args.dataset, sigma=args.sigma, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      bf16=not args.no_bf16, device=args.device,
                      train_images=args.train_images, init=args.init,
                      init_other_sigma=args.init_other_sigma,
                      consistency=args.consistency, noise_copies=args.noise_copies,
                      consistency_eta=args.consistency_eta, swa_epochs=args.swa_epochs,
                      swa_lr=args.swa_lr, teachers=tuple(args.teacher),
                      distill=args.distill if args.distill is not None else 0.5 * bool(args.teacher),
                      distill_temperature=args.distill_temperature)
    meta = train(cfg, args.out, data_dir=args.data_dir, resume=args.resume,
                 log_dir=args.log_dir or (args.out + ".tb"))
    return {k: v for k, v in meta.items() if k != "history"} | {"out": args.out}
