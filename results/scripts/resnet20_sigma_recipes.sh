#!/usr/bin/env bash
# Issue 20, step 1: which warm restart of a shipped ResNet-20 raises CERTIFY at radius 0 most, at
# equal compute (about 30 min each on the idle 2-core CPU)?
#   plain:       EPOCHS_PLAIN (20) epochs of Gaussian noise augmentation;
#   consistency: EPOCHS_CONS (10) epochs with Jeong and Shin's regulariser, m = 2 noisy copies
#                (twice the cost of an epoch), one candidate per lambda in LAMBDAS ("20": their
#                setting at sigma 0.5 and 1.0; smaller lambdas trade less clean accuracy).
#   swa:         SWA_EPOCHS (0: skipped) epochs at the constant lr SWA_LR (0.02), the weights of
#                every epoch's end averaged (stochastic weight averaging, `arq-gym train
#                --swa-epochs`), with consistency lambda SWA_LAMBDA (0: plain noise); named
#                swa-lL.
#   scratch:     EPOCHS_SCRATCH (0: skipped) epochs of Gaussian noise augmentation from a fresh
#                initialisation (seed SCRATCH_SEED, 1), one cosine schedule from lr 0.1: the shipped
#                models grew by warm restarts of 24-64 epochs; this asks whether one long
#                schedule does better. Named scratch-eE. SCRATCH_MODEL (default resnet20) trains
#                another architecture the same way, as a teacher for distill (checkpoint
#                runs/SCRATCH_MODEL_s${S}_scratch-eE.pt; not certified unless it is resnet20).
#   distill:     EPOCHS_DISTILL (0: skipped) epochs of knowledge distillation (`arq-gym train
#                --teacher`, weight DISTILL_ALPHA, 0.5, temperature 1) from the ensemble of
#                TEACHERS (default "shipped scratch-e80": the shipped model and
#                runs/resnet20_s${S}_scratch-e80.pt, the best pair of
#                results/scripts/ensemble_noisy_accuracy.py at sigma 1.0; an entry with a "/"
#                is a checkpoint path, e.g. runs/resnet56_s1.0_scratch-e36.pt), with the consistency
#                regulariser at lambda DISTILL_LAMBDA (0: none). Named distill-eE (-lL with it),
#                followed by DISTILL_TAG (default empty; e.g. "-t3" for another teacher set).
#   curriculum:  EPOCHS_CURRICULUM (0: skipped) epochs of Gaussian noise at sigma S from the shipped
#                model of sigma CURRICULUM_FROM (default 0.5), lr 0.05 (a noise curriculum, `arq-gym
#                train --init-other-sigma`: features learnt on less corrupted images first), named
#                curriculum-eE; then CURRICULUM_CONS (0: none) epochs of the consistency regulariser
#                at lambda CURRICULUM_LAMBDA (2) from it, lr 0.05, named curriculum-eE-lL.
# RECIPES (default "plain consistency swa") picks which families run.
# The others start from the shipped model of sigma S (default 1.0) with a fresh cosine schedule
# from lr 0.05. Each candidate and the shipped model are then certified alike on 500 held-out
# validation images (never the test images: this is model selection) with n = 1,000,
# alpha = 0.001, the same noise. Outputs: runs/ (checkpoints, gitignored) and
# results/experiments/sigma_recipes/s$S/*.json (committed). Every step is skipped when its output
# exists and training resumes per epoch: rerun the same command after an interruption.
set -euo pipefail
S=${S:-1.0}
EPOCHS_PLAIN=${EPOCHS_PLAIN:-20}
EPOCHS_CONS=${EPOCHS_CONS:-10}
LAMBDAS=${LAMBDAS:-20}
SWA_EPOCHS=${SWA_EPOCHS:-0}
SWA_LR=${SWA_LR:-0.02}
SWA_LAMBDA=${SWA_LAMBDA:-0}
EPOCHS_SCRATCH=${EPOCHS_SCRATCH:-0}
SCRATCH_SEED=${SCRATCH_SEED:-1}
SCRATCH_MODEL=${SCRATCH_MODEL:-resnet20}
EPOCHS_DISTILL=${EPOCHS_DISTILL:-0}
DISTILL_ALPHA=${DISTILL_ALPHA:-0.5}
TEACHERS=${TEACHERS:-shipped scratch-e80}
DISTILL_LAMBDA=${DISTILL_LAMBDA:-0}
DISTILL_TAG=${DISTILL_TAG:-}
EPOCHS_CURRICULUM=${EPOCHS_CURRICULUM:-0}
CURRICULUM_FROM=${CURRICULUM_FROM:-0.5}
CURRICULUM_CONS=${CURRICULUM_CONS:-0}
CURRICULUM_LAMBDA=${CURRICULUM_LAMBDA:-2}
RECIPES=${RECIPES:-plain consistency swa}
SHIPPED=arq_gym/models/weights/resnet20_cifar10_s$S.pt
OUT=results/experiments/sigma_recipes/s$S
mkdir -p runs "$OUT"

train() {  # name, extra arguments... (a warm restart of the shipped model unless they say --lr)
  local name=$1; shift
  local model=${TRAIN_MODEL:-resnet20}
  local ckpt=runs/${model}_s${S}_$name.pt
  if [ ! -f "$ckpt" ]; then
    local resume=(); [ -f "$ckpt.resume.pt" ] && resume=(--resume)
    local start=(--init "$SHIPPED" --lr 0.05); [[ " $* " == *" --lr "* ]] && start=()
    local tag=$name; [ "$model" = resnet20 ] || tag=$model-$name
    arq-gym train --model "$model" --sigma "$S" "${start[@]}" --out "$ckpt" \
      "${resume[@]}" --json "$@" | tail -1 > "$OUT/train_$tag.json.tmp"
    mv "$OUT/train_$tag.json.tmp" "$OUT/train_$tag.json"
  fi
}

certify() {  # name, checkpoint (certify writes the .json summary beside its --out TSV)
  [ -s "$OUT/val500_n1000_$1.json" ] || arq-gym certify --checkpoint "$2" --split val \
    --images 500 --n 1000 --out "$OUT/val500_n1000_$1.tsv" --quiet
}

SHA=$(sha256sum "$SHIPPED" | cut -c1-8)
certify "shipped-$SHA" "$SHIPPED"  # named by its sha256: the shipped model may change
if [[ " $RECIPES " == *" plain "* ]]; then
  train plain --epochs "$EPOCHS_PLAIN"
  certify plain "runs/resnet20_s${S}_plain.pt"
fi
if [[ " $RECIPES " == *" consistency "* ]]; then
  for LAMBDA in $LAMBDAS; do
    train "consistency-l$LAMBDA" --epochs "$EPOCHS_CONS" --consistency "$LAMBDA"
    certify "consistency-l$LAMBDA" "runs/resnet20_s${S}_consistency-l$LAMBDA.pt"
  done
fi
if [[ " $RECIPES " == *" swa "* ]] && [ "$SWA_EPOCHS" -gt 0 ]; then
  train "swa-l$SWA_LAMBDA" --epochs "$SWA_EPOCHS" --swa-epochs "$SWA_EPOCHS" --swa-lr "$SWA_LR" \
    --consistency "$SWA_LAMBDA"
  certify "swa-l$SWA_LAMBDA" "runs/resnet20_s${S}_swa-l$SWA_LAMBDA.pt"
fi
if [[ " $RECIPES " == *" scratch "* ]] && [ "$EPOCHS_SCRATCH" -gt 0 ]; then
  TRAIN_MODEL=$SCRATCH_MODEL train "scratch-e$EPOCHS_SCRATCH" --epochs "$EPOCHS_SCRATCH" --lr 0.1 \
    --seed "$SCRATCH_SEED"
  [ "$SCRATCH_MODEL" != resnet20 ] ||
    certify "scratch-e$EPOCHS_SCRATCH" "runs/resnet20_s${S}_scratch-e$EPOCHS_SCRATCH.pt"
fi
if [[ " $RECIPES " == *" distill "* ]] && [ "$EPOCHS_DISTILL" -gt 0 ]; then
  teacher_args=()
  for t in $TEACHERS; do
    if [ "$t" = shipped ]; then teacher_args+=(--teacher "$SHIPPED")
    elif [[ "$t" == */* ]]; then teacher_args+=(--teacher "$t")
    else teacher_args+=(--teacher "runs/resnet20_s${S}_$t.pt"); fi
  done
  name=distill-e$EPOCHS_DISTILL; [ "$DISTILL_LAMBDA" = 0 ] || name=$name-l$DISTILL_LAMBDA
  name=$name$DISTILL_TAG
  train "$name" --epochs "$EPOCHS_DISTILL" --distill "$DISTILL_ALPHA" "${teacher_args[@]}" \
    --consistency "$DISTILL_LAMBDA"
  certify "$name" "runs/resnet20_s${S}_$name.pt"
fi
if [[ " $RECIPES " == *" curriculum "* ]] && [ "$EPOCHS_CURRICULUM" -gt 0 ]; then
  name=curriculum-e$EPOCHS_CURRICULUM
  train "$name" --epochs "$EPOCHS_CURRICULUM" --lr 0.05 --init-other-sigma \
    --init "arq_gym/models/weights/resnet20_cifar10_s$CURRICULUM_FROM.pt"
  certify "$name" "runs/resnet20_s${S}_$name.pt"
  if [ "$CURRICULUM_CONS" -gt 0 ]; then
    train "$name-l$CURRICULUM_LAMBDA" --epochs "$CURRICULUM_CONS" --lr 0.05 \
      --init "runs/resnet20_s${S}_$name.pt" --consistency "$CURRICULUM_LAMBDA"
    certify "$name-l$CURRICULUM_LAMBDA" "runs/resnet20_s${S}_$name-l$CURRICULUM_LAMBDA.pt"
  fi
fi
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("val500_n1000_*.json")):
    s = json.loads(path.read_text())
    print(f"{path.stem:28s} certified at r=0 {s['clean_accuracy']:.3f}  ACR {s['acr']:.3f}  "
          f"abstain {s['abstain_rate']:.3f}")
PY
