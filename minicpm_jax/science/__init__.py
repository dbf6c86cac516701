"""The model wind tunnel and WSD scaling laws (docs/recipe.md §3–6): sweeps, the batch-size law, scaling-law fits,
plots.

    shapes.py          the wind-tunnel proxy shapes (docs/recipe.md §3.4) as config overrides
    sweep.py           grid / random sweeps of short runs, resumable, one results table
    results.py         reading a run directory's final losses, N and D
    scaling.py         L(N, D) = C_N·N^−α + C_D·D^−β + L0: fit, uncertainties, compute-optimal split, envelopes
    batch_size_law.py  bs = a / L^b from equal-loss points (the paper's procedure)
    plots.py           the PNGs
    commands.py        `sweep`, `lr-transfer`, `fit-batch-size`, `fit-scaling`

scipy and matplotlib (the `science` extra) are imported inside the functions that need them.
"""
