#!/usr/bin/env bash
# Issue 19's Pareto front: the paper's DDPG agent at three BOPs budgets, 1/32, 1/64 and 1/128
# (1/16 constrains nothing: every layer at 8 bits is 1/16 of the FP32 BOPs), 100 episodes each
# (fidelity "search", separate weight/activation bits), every best policy, uniform W8/6/5/4/3 and
# FP32 certified on the same 500 test images with n = 1,000 (reduced from 10,000 to fit the
# 2-core CPU). Two searches run side by side with one thread each (about 14 s an episode).
# The 1/64 search is the leaderboard's arq-ddpg seed-0 run, copied into searches/1-64 (see
# results/README.md). Resumable: rerun the same command after an interruption.
set -euo pipefail
arq-gym pareto --env ARQ-ResNet20-v0 --agent arq-ddpg --budgets 1/32,1/64,1/128 \
  --episodes 100 --images 500 --n 1000 \
  --workers 2 --out results/pareto_resnet20_s0.25 --resume "$@"
