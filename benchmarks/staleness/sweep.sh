#!/usr/bin/env bash
# The commands behind sweep.md. Seeds 100+ only (the reported seeds are 0, 1, 2).
# Each phase overrides the settings that were the defaults at the time (--set), so every
# phase reruns as it ran. ≈ 5–10 min per phase on 2 free cores.
set -euo pipefail
OUT=${OUT:-sweep-out}
ALL=ppo,ppo_tis,icepop,gspo,cispo,decoupled_ppo,m2po,dppo_binary_tv,dppo_topk_tv,delight,vcpo,gac

# Phase 1: uniform initial policy, per-token reward, lr 3e-3 (BENCHMARK.md's calibration, H = M = 8).
stable-async bench --preset full --methods $ALL --lags 0,32,128 --seeds 100 \
    --set head_scale=1 --set lr=3e-3 --out $OUT/phase1

# Phase 2: credit only for the correct prefix (M = H = 6), lr 3e-3.
stable-async bench --preset full --methods $ALL --lags 0,8,32,128 --seeds 100 \
    --set head_scale=1 --set lr=3e-3 --set reward=prefix --set symbols=6 --set length=6 --out $OUT/phase2

# Phase 3: confident initial policy (head_scale 3), per-token reward, lr 3e-3.
stable-async bench --preset full --methods $ALL --lags 0,8,32,128 --seeds 100 \
    --set lr=3e-3 --out $OUT/phase3

# Phase 4 (the shipped defaults: head_scale 3, lr 1.5e-3) with the combinations.
stable-async bench --preset full --methods $ALL,ppo_tis_ess,delight_tis,dppo_tv_ess,gac_tau0 \
    --lags 0,32,128 --seeds 100 --out $OUT/phase4
