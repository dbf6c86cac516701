"""The model wind tunnel (docs/recipe.md §3) scaled down for a CPU: a μP proxy that sweeps in seconds per point.

The paper tunes on a 9M-parameter proxy (d_m 320, L 8, head_dim 64, d_ff 2.5·d_m; all proxy shapes are in
minicpm_jax/science/shapes.py) trained on |D| = 10N tokens, then transfers the optimum to larger widths
under μP. On 2 CPU cores that proxy takes about a second per step, so this config keeps the shape rules
(d_ff = 2.5·d_m, MHA, the μP scalars 12 / 1.4 / 0.1) at a smaller scale: d_m 128, L 4, head_dim 32,
dim_model_base 128 (the proxy is the μP base width), 160 steps of 8 × 64 tokens ≈ 82K tokens. That is
≈ 0.1N, far below the paper's 10N: a CPU sweep measures early training, where larger learning rates win.
On real hardware, select the paper's proxy with the sweep key
`shape=9M` (or `shape=30M`, ...) and set train.seq_len / global_batch_size / steps for 10N tokens.

Data: the demo corpus where `make demo` prepares it (demo_out/), as configs/demo.py.
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "demo")
    cfg.model.hidden_size = 128
    cfg.model.intermediate_size = 320
    cfg.model.num_layers = 4  # L 4 and 4 heads (head_dim 32) as demo.py, stated here: they are the proxy's shape
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 4
    cfg.model.dim_model_base = 128

    cfg.train.steps = 160
    cfg.train.global_batch_size = 8  # as demo.py, stated here: 8 × 64 tokens per step is the proxy's budget
    cfg.train.seq_len = 64
    cfg.train.eval_every_steps = 160  # one held-out evaluation, at the end: the sweep's final loss
    # WSD with the paper's ~10% decay, as fractions of train.steps (of 160: 8 warmup, 136 stable, 16 decay steps),
    # so that a sweep over train.steps rescales the phases with it. W is demo.py's, given with S and D.
    cfg.schedule.warmup_steps = 0.05
    cfg.schedule.stable_steps = 0.85
    cfg.schedule.decay_steps = 0.1
    cfg.checkpoint.every_steps = 80
    cfg.checkpoint.keep_every_steps = 0
    cfg.checkpoint.async_save = False  # short runs: a background save would outlive the run
    return cfg
