#!/usr/bin/env bash
# Issue 19's Pareto front: the paper's DDPG agent at three BOPs budgets (100 episodes each,
# fidelity "search", separate weight/activation bits), every best policy, uniform W8/6/5/4/3 and
# FP32 certified on the same 500 test images with n = 1,000 (reduced from 10,000 to fit the
# 2-core CPU). Two searches run side by side with one thread each: one search on one thread beside
# another heavy job took 12.5 s per episode, against 8.7 s alone on two threads. Resumable: rerun
# the same command after an interruption.
set -euo pipefail
arq-gym pareto --env ARQ-ResNet20-v0 --agent arq-ddpg --budgets 1/16,1/32,1/64 \
  --episodes 100 --images 500 --n 1000 \
  --workers 2 --out results/pareto_resnet20_s0.25 --resume "$@"
