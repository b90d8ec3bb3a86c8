#!/usr/bin/env bash
# Issue 19's leaderboard: five agents x 2 seeds x 100 episodes on ResNet-20 (sigma 0.25, fidelity
# "search", separate weight/activation bits), then every best policy certified on the same 500
# test images. n is reduced from 10,000 to 1,000 to fit the 2-core CPU (each search already
# costs about 13 minutes there); the smallest certifiable radius changes, the ranking is what
# the leaderboard is for. Two searches run side by side with one thread each: one search on one
# thread beside another heavy job took 12.5 s per episode, against 8.7 s alone on two threads.
# Resumable: rerun the same command after an interruption.
set -euo pipefail
arq-gym benchmark --env ARQ-ResNet20-v0 \
  --agents random,arq-ddpg,optuna-tpe,optuna-cmaes,sb3-td3 --seeds 2 --episodes 100 \
  --final-images 500 --final-n 1000 \
  --workers 2 --out results/leaderboard_resnet20_s0.25 --resume "$@"
