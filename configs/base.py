"""Every knob of minicpm-jax, with its default. Other configs start here and override what differs.

The model defaults are MiniCPM-2.4B (facts §1.1); the μP scalars are the paper's wind-tunnel optimum
(facts §4): scale_emb 12, scale_depth 1.4, init_std 0.1, dim_model_base 256.
"""

import ml_collections


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
    model.rope_theta = 10000.0  # RoPE base θ
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
    model.remat_policy = "none"  # none | full | save_dots | save_dots_no_batch (what the backward recomputes)
    model.parametrization = "mup"  # mup: 2-D init std and lr divided by width ratio; standard: plain (control)
    model.embedding_in_2d_group = True  # μP treats the embedding as a 2-D tensor (the paper's literal Table 7)

    cfg.data = data = ml_collections.ConfigDict()
    # Per training phase: "DIR:WEIGHT,DIR:WEIGHT" of prepared folders; weights are token fractions (normalised).
    # A string, not a dict, because ConfigDict keys cannot hold the dots of paths; works as --config.data.mixtures.decay=...
    data.mixtures = ml_collections.ConfigDict({"stable": "", "decay": ""})  # "" decay -> uses the stable mixture
    data.shuffle_seed = 0  # seed of document shuffles, mixing and packing-bin order
    data.num_workers = 0  # Grain worker processes (0 = in-process)
    data.worker_buffer_size = 2  # batches prefetched per worker
    data.num_packing_bins = 0  # first-fit packing bins; 0 = local batch size (values below it are raised to it)
    data.val_dir = ""  # prepared held-out folder (e.g. data/demo/shakespeare/val); "" = none
    data.tokenizer = ""  # SentencePiece .model; checked against the data's tokenizer sha256
    return cfg
