#!/usr/bin/env bash
# Issue 20, step 2: ship the ResNet-20 of sigma S that won the model selection of
# resnet20_sigma_recipes.sh (RECIPE: the candidate's name, e.g. plain, consistency-lL, swa-lL,
# scratch-eE, distill-eE-lL or curriculum-eE-lL: the checkpoint runs/resnet20_sS_RECIPE.pt), then
#   1. replace the shipped model (its sha256 joins the manifest's previous_sha256, its IRS caches
#      go) and move the old model's test certification to results/certify/superseded/, named
#      with the first 8 hex digits of the old model's sha256;
#   2. build and ship the new model's IRS caches (fidelities smoke and search);
#   3. certify it on the 500 test images (every 20th), n = 10,000, alpha = 0.001, as the old one.
# One heavy step at a time; every step is skipped when its output exists and the certification
# resumes from its saved chunks: rerun the same command after an interruption.
#   S=1.0 RECIPE=consistency-l2 bash results/scripts/resnet20_sigma_ship.sh
set -euo pipefail
S=${S:?set S, the noise level (0.5 or 1.0)}
RECIPE=${RECIPE:?set RECIPE, the winning candidate (e.g. consistency-l2 or curriculum-e30-l2)}
CKPT=runs/resnet20_s${S}_$RECIPE.pt
OUT=results/experiments/sigma_recipes/s$S
C=results/certify/resnet20_cifar10_s${S}_test500_n10000
[ -f "$CKPT" ] || { echo "no candidate $CKPT: run resnet20_sigma_recipes.sh first" >&2; exit 2; }

SHIPPED=arq_gym/models/weights/resnet20_cifar10_s$S.pt
OLD_SHA=$(sha256sum "$SHIPPED" | cut -c1-8)
if [ "$(sha256sum "$CKPT" | cut -c1-8)" != "$OLD_SHA" ]; then  # not shipped yet
  mkdir -p results/certify/superseded
  for ext in json tsv; do
    if [ -f "$C.$ext" ]; then mv "$C.$ext" "results/certify/superseded/$(basename "$C")-$OLD_SHA.$ext"; fi
  done
  python - "$CKPT" "$RECIPE" > "$OUT/shipped.json.tmp" <<'PY'
import json, sys
from arq_gym.models.zoo import ship
entry = ship(sys.argv[1])
print(json.dumps({**entry, "recipe": sys.argv[2]}, indent=2))
PY
  mv "$OUT/shipped.json.tmp" "$OUT/shipped.json"
fi

python - "$S" <<'PY'
import sys
from arq_gym.problem import make_problem, ship_irs_cache
for fidelity in ("smoke", "search"):
    print(ship_irs_cache(make_problem(model="resnet20", sigma=float(sys.argv[1]),
                                      fidelity=fidelity)))
PY

[ -s "$C.json" ] || arq-gym certify --model resnet20 --sigma "$S" --split test --images 500 \
  --n 10000 --out "$C.tsv" --quiet  # writes $C.json too
python - "$C.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
ca = s["certified_accuracy"]
print(f"test500 n=10000: certified at r=0 {ca['0.0']:.3f}, r=0.5 {ca['0.5']:.3f}, "
      f"r=1.0 {ca['1.0']:.3f}, ACR {s['acr']:.3f}, abstain {s['abstain_rate']:.3f}")
PY
