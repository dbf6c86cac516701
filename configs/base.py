"""Every knob of minicpm-jax, with its default. Other configs start here and override what differs.

The model defaults are MiniCPM-2.4B (facts §1.1); the μP scalars are the paper's wind-tunnel optimum
(facts §4): scale_emb 12, scale_depth 1.4, init_std 0.1, dim_model_base 256.
"""

import ml_collections


def steps_or_fraction(value):
    return ml_collections.FieldReference(value, field_type=object)


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()

    cfg.model = model = ml_collections.ConfigDict()
    model.vocab_size = 122753  # tokenizer size; MiniCPM-2.4B's 120K SentencePiece vocabulary
    model.hidden_size = 2304  # d_m, the residual width
    model.intermediate_size = 5760  # d_ff of the SwiGLU MLP (2.5 · d_m)
    model.num_layers = 40  # L, decoder blocks (stacked and scanned)
    model.num_heads = 36  # query heads; head_dim = hidden_size / num_heads
    model.num_kv_heads = 36  # key/value heads (GQA when fewer than num_heads); must divide num_heads
    model.max_position_embeddings = 4096  # longest sequence trained on (exported to HF configs)
    model.rope_theta = 10000.0  # RoPE base θ (ABF, "adjusted base frequency", is just a larger θ; 128K: 1e6)
    # RoPE scaling (facts §1.3): default | linear (position interpolation) | dynamic (NTK) | longrope.
    model.rope_scaling = "default"
    model.rope_factor = 1.0  # linear/dynamic scale factor (128K: dynamic, 4); longrope: max_pos / original max
    # dynamic NTK: per_length = HF's rule (base grows once max position + 1 exceeds max_position_embeddings);
    # static = vLLM's (the base for max_position_embeddings · factor at every length)
    model.rope_dynamic_mode = "per_length"
    model.rope_original_max_position_embeddings = 0  # longrope: context before extension (0 = max_position_embeddings)
    model.rope_short_factor = ()  # longrope: head_dim/2 divisors of the frequencies up to the original context
    model.rope_long_factor = ()  # longrope: the same beyond it
    model.rms_norm_eps = 1e-5  # RMSNorm epsilon (the HF class default 1e-6 is not what checkpoints use)
    model.scale_emb = 12.0  # embedding output multiplier
    model.scale_depth = 1.4  # residual branches are scaled by scale_depth / sqrt(num_layers)
    model.dim_model_base = 256  # μP base width; the final hidden is divided by hidden_size / dim_model_base
    model.init_std = 0.1  # std of the normal init of matrices (before any μP width scaling)
    model.tie_word_embeddings = True  # the LM head reuses the input embedding
    model.bos_token_id = 1  # <s>
    model.eos_token_id = 2  # </s>
    model.dtype = "float32"  # compute dtype: float32 on CPU, bfloat16 on TPU/GPU
    model.param_dtype = "float32"  # parameter storage dtype
    # What the backward recomputes: none | full | save_dots | save_dots_no_batch. save_dots_no_batch keeps the
    # weight matmuls' outputs and recomputes the cheap elementwise work: measured on CPU (BENCHMARKS.md) as fast
    # as none, with 35-42% less training memory per token.
    model.remat_policy = "save_dots_no_batch"
    model.parametrization = "mup"  # mup: 2-D init std and lr divided by width ratio; standard: plain (control)
    # Whether μP scales the embedding's init and lr like a 2-D tensor (the paper's literal Table 7 reading).
    # Off by default: measured, it shrinks the residual stream as 1/sqrt(width ratio) (tests/test_parametrization.py).
    model.embedding_in_2d_group = False
    # Mixture of experts (MiniCPM-MoE, facts §2.3): every MLP becomes num_experts SwiGLU experts, top-k routed.
    model.num_experts = 0  # 0 = the dense model
    model.num_experts_per_tok = 2  # k: experts per token; their router weights are renormalised to sum to 1
    model.moe_dispatch = "grouped"  # grouped: each expert runs only its tokens; dense: every expert sees every token
    model.moe_capacity_factor = 0.0  # 0 = dropless; c > 0 keeps at most ceil(c·k·tokens/experts) tokens per expert
    model.router_aux_loss_coef = 0.01  # Switch load-balancing loss weight (the paper's 0.01)
    model.router_z_loss_coef = 0.0  # router z-loss weight (ST-MoE uses 1e-3); 0 = off
    # auto: cuDNN flash attention on GPU (bf16/fp16), Pallas splash on TPU, elsewhere XLA dot-product up to
    # 2048 tokens and chunked (flash-style, memory linear in length) above | xla | chunked | cudnn | splash
    model.attention_impl = "auto"
    model.attention_block_size = 512  # query/key block of the chunked kernel (memory ~ length · block)

    cfg.train = train = ml_collections.ConfigDict()
    train.steps = 1000  # optimizer steps in the whole run (W + S + D of a WSD schedule must fit in it)
    train.global_batch_size = 8  # sequences per optimizer step, over all hosts (the paper: 4M tokens)
    train.seq_len = 512  # tokens per sequence (the paper: 4096)
    train.seed = 0  # parameter-init seed
    train.grad_accum_steps = 1  # micro-batches per step (same update as the whole batch, less memory)
    train.log_every_steps = 10  # one metrics.jsonl line and one progress line every N steps
    train.eval_every_steps = 0  # held-out evaluation on data.val_dir every N steps (0 = off)
    train.eval_batches = 8  # batches per evaluation
    train.peak_flops_per_device = 0.0  # for MFU; 0 = known TPU/H100/H200 peaks, else MFU is not reported
    # Log gradient cosine, update size and directional derivatives (science/dynamics.py); costs 2 param copies.
    train.log_update_stats = False

    cfg.schedule = schedule = ml_collections.ConfigDict()
    # Phase lengths are ints (steps) or floats in (0, 1] (fractions of train.steps); W + S + D <= train.steps.
    schedule.name = "wsd"  # wsd | cosine | constant
    schedule.peak_lr = 0.01  # the paper's base lr; μP divides it per 2-D tensor by the width ratio
    # (typed `object` so that an override keeps an int as a step count instead of turning it into a float)
    schedule.warmup_steps = steps_or_fraction(0.01)  # W: linear warmup from 0 to the peak (the paper does not report W)
    schedule.stable_steps = steps_or_fraction(0.89)  # S: hold the peak
    schedule.decay_steps = steps_or_fraction(0.1)  # D: decay to peak·final_lr_ratio (the paper: ~10% of tokens suffices)
    schedule.decay = "exp"  # exp (MiniCPM) | linear | cosine | 1-sqrt
    schedule.final_lr_ratio = 0.1  # r: lr at the end of the decay, relative to the peak (MiniCPM: 1e-2 -> 1e-3)
    schedule.decay_half_life_steps = 0  # > 0 with exp: r = 0.5^(D / half_life), MiniCPM's half-life form

    cfg.optim = optim = ml_collections.ConfigDict()
    # The paper reports only "Adam"; betas, eps, weight decay and clipping are our choices (facts §9).
    optim.b1 = 0.9  # Adam first-moment decay
    optim.b2 = 0.95  # Adam second-moment decay
    optim.eps = 1e-8  # Adam epsilon
    optim.weight_decay = 0.1  # decoupled (AdamW), scaled by each tensor's lr like PyTorch param groups
    optim.weight_decay_on = "2d"  # 2d (the tensors μP treats as 2-D) | all | none
    optim.clip_grad_norm = 1.0  # global-norm gradient clipping (0 disables)

    cfg.checkpoint = checkpoint = ml_collections.ConfigDict()
    checkpoint.every_steps = 100  # save every N steps (and at the end, and on SIGTERM/SIGINT)
    checkpoint.keep_last = 3  # keep the latest N checkpoints for resuming
    checkpoint.keep_every_steps = 0  # also save and keep every Mth step permanently, for branching (0 = none)
    checkpoint.async_save = True  # write checkpoints in the background while training continues
    # Also save when this many minutes have passed since the last save (checked at log steps; 0 = off).
    # Such a save is a resume point only: the next save of any kind replaces it.
    checkpoint.every_minutes = 0.0

    cfg.mesh = mesh = ml_collections.ConfigDict()
    # Devices per mesh axis within a slice (ICI); one may be -1 for "the rest of the devices".
    mesh.data = 1  # pure data parallelism (parameters replicated across it)
    mesh.fsdp = -1  # ZeRO-3: batch and parameters split over it
    mesh.tensor = 1  # Megatron-style tensor parallelism (heads, MLP width, vocabulary)
    mesh.expert = 1  # expert parallelism (MoE)
    mesh.sequence = 1  # sequence (context) parallelism for long sequences
    mesh.dcn_data = 1  # multi-slice TPU: slices along data (across the data-center network)
    mesh.dcn_fsdp = 1  # multi-slice TPU: slices along fsdp
    mesh.rules = "fsdp"  # logical-axis rules preset: dp | fsdp | fsdp_tp

    cfg.data = data = ml_collections.ConfigDict()
    # Per training phase: "DIR:WEIGHT,DIR:WEIGHT" of prepared folders; weights are token fractions (normalised).
    # A string, not a dict, because ConfigDict keys cannot hold the dots of paths; works as --config.data.mixtures.decay=...
    data.mixtures = ml_collections.ConfigDict({"stable": "", "decay": ""})  # "" decay -> uses the stable mixture
    # Per phase sequence length, a length curriculum (e.g. stable 4096 -> decay 32768); 0 = train.seq_len.
    data.seq_lens = ml_collections.ConfigDict({"stable": 0, "decay": 0})
    data.shuffle_seed = 0  # seed of document shuffles, mixing and packing-bin order
    data.num_workers = 0  # Grain worker processes (0 = in-process)
    data.worker_buffer_size = 2  # batches prefetched per worker
    data.num_packing_bins = 0  # first-fit packing bins; 0 = local batch size (values below it are raised to it)
    data.num_shards = 0  # disjoint data shards (0 = one per process); fix it to keep the data when host counts change
    data.val_dir = ""  # prepared held-out folder (e.g. data/demo/shakespeare/val); "" = none
    data.tokenizer = ""  # SentencePiece .model; checked against the data's tokenizer sha256
    return cfg
