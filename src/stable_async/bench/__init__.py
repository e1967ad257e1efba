"""The staleness stress benchmark: simulated asynchronous RL post-training on a CPU.

Read it top to bottom in this order: `tasks` (what is learned), `model` (the policy and its
sampler), `warmstart` (the supervised phase before RL), `engine` (stale snapshots under a
staleness model, engine mismatch, frictions), `methods` (every stabilizer and its
hyperparameters), `trainer` (one run, public `stable_async` API only), `costmodel` (simulated
wall-clock), `runner` (the grid), `report` and `plots` (what gets written), `presets`, and
`__main__` (the command line).

    stable-async bench --preset quick --out bench-out
"""
