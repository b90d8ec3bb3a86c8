#!/usr/bin/env bash
# Issue 20: the results table of the shipped ResNet-20 at noise level S (0.5 or 1.0), with every
# row of the sigma 0.25 table (FP32, uniform W8A8 and W4A4, HAQ-style, ARQ and random searches,
# each quantized row also fine-tuned for 3 epochs, NIPQ with the same training budget), the
# same settings: searches of 200 episodes (seed 0, fidelity "search", separate bits) on
# validation images, every row certified on the same 500 test images, n0 = 100, n = 10,000,
# alpha = 0.001. About 6 hours on the idle 2-core CPU; every search checkpoints each episode and
# every certification each 25 images: rerun the same command after an interruption.
#   S=0.5 bash results/scripts/table_resnet20_sigma.sh
set -euo pipefail
S=${S:?set S, the noise level (0.5 or 1.0)}
arq-gym table --env ARQ-ResNet20-v0 --env-kwargs sigma="$S" \
  --rows fp32,w8a8,w4a4,haq,arq,random,nipq --episodes 200 --seed 0 \
  --images 500 --n 10000 --n0 100 --alpha 0.001 --finetune-epochs 3 \
  --out "results/resnet20_cifar10_s${S}_finetuned" --resume "$@"
