#!/usr/bin/env bash
# Issue 17's CIFAR MobileNetV2 (width 0.5), one heavy step at a time on an idle CPU, each step
# skipped when its output exists (rerun the script after an interruption):
# 1. train with sigma 0.25 Gaussian noise (resumable per epoch; EPOCHS, default 30);
# 2. ship it into the package and build its IRS caches (smoke and search fidelity);
# 3. certify it on 500 test images (every 20th), n = 10,000, alpha = 0.001;
# 4. one search with the paper's DDPG agent (EPISODES, default 100). Its id,
#    ARQ-MobileNetV2-CIFAR-v0, is registered together with the shipped model (not yet: step 2
#    ships the weights, the id and its rl-zoo3 entry are the code change that goes with them).
set -euo pipefail
EPOCHS=${EPOCHS:-30}
EPISODES=${EPISODES:-100}
CKPT=runs/mobilenet_v2_cifar_s0.25.pt
OUT=results/mobilenet_v2_cifar_s0.25
mkdir -p runs "$OUT" results/certify
if [ ! -f "$CKPT" ]; then
  RESUME=(); [ -f "$CKPT.resume.pt" ] && RESUME=(--resume)
  arq-gym train --model mobilenet_v2_cifar --sigma 0.25 --epochs "$EPOCHS" --out "$CKPT" \
    "${RESUME[@]}" --json | tail -1 > "$OUT/train.json"
fi
python - "$CKPT" <<'PY'
import sys
from arq_gym.models.zoo import find_shipped, ship
from arq_gym.problem import make_problem, ship_irs_cache
try:
    find_shipped("mobilenet_v2_cifar", "cifar10", 0.25)
except Exception:
    print(ship(sys.argv[1]))
for fidelity in ("smoke", "search"):
    print(ship_irs_cache(make_problem(model="mobilenet_v2_cifar", fidelity=fidelity)))
PY
C=results/certify/mobilenet_v2_cifar_s0.25
[ -s "$C.json" ] || arq-gym certify --model mobilenet_v2_cifar --sigma 0.25 --split test \
  --images 500 --n 10000 --out "$C.tsv" --quiet  # writes $C.json too
RESUME=(); [ -d "$OUT/search_arq" ] && RESUME=(--resume)
arq-gym search --env ARQ-MobileNetV2-CIFAR-v0 --agent arq-ddpg --episodes "$EPISODES" \
  --out "$OUT/search_arq" "${RESUME[@]}"
