"""One loader for everything that runs a trained model (generate, chat, eval, lm-eval): a run directory
or a Hugging Face folder, and the tokenizer that belongs to it."""

from __future__ import annotations

import logging
import os

from minicpm_jax import storage
from minicpm_jax.data.tokenizer import Tokenizer
from minicpm_jax.hf import SAFE_INDEX, SAFE_SINGLE, load_hf
from minicpm_jax.hf.tokenizer import HF_TOKENIZER_FILE
from minicpm_jax.model.transformer import MiniCPM
from minicpm_jax.run.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, restore_model
from minicpm_jax.run.inputs import run_tokenizer

log = logging.getLogger(__name__)


def is_run_dir(path: str) -> bool:
    return storage.is_file(storage.join(path, CONFIG_FILE)) and storage.is_dir(storage.join(path, CHECKPOINT_DIR))


def is_hf_dir(path: str) -> bool:
    return storage.is_file(storage.join(path, CONFIG_FILE)) and any(
        storage.is_file(storage.join(path, name)) for name in (SAFE_SINGLE, SAFE_INDEX))


def load_for_inference(path: str | os.PathLike, step: int | None = None,
                       tokenizer: str | os.PathLike | None = None) -> tuple[MiniCPM, Tokenizer | None]:
    """(model, tokenizer) from a run directory (checkpoint `step`, default the latest) or an HF folder.

    The tokenizer is `tokenizer` if given, else the run's own (RUN/tokenizer.model, else its `data.tokenizer`),
    else the HF folder's tokenizer.model; None when there is none (token-level use only).
    """
    path = os.fspath(path)
    if is_run_dir(path):
        model, cfg = restore_model(path, step)
        default_tokenizer = run_tokenizer(path, cfg)
    elif is_hf_dir(path):
        if step is not None:
            raise ValueError(f"{path} is a Hugging Face folder, which has no steps; drop step={step}")
        model, _ = load_hf(path)
        default_tokenizer = storage.join(path, HF_TOKENIZER_FILE)
    else:
        raise FileNotFoundError(f"{path} is neither a run directory ({CONFIG_FILE} and {CHECKPOINT_DIR}/) nor a "
                                f"Hugging Face folder ({CONFIG_FILE} and {SAFE_SINGLE} or {SAFE_INDEX})")
    tokenizer_path = tokenizer or (default_tokenizer if default_tokenizer and storage.is_file(default_tokenizer)
                                   else None)
    loaded_tokenizer = Tokenizer(tokenizer_path) if tokenizer_path else None
    if loaded_tokenizer and loaded_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {loaded_tokenizer.vocab_size} pieces but the model in {path} "
                         f"has only vocab_size={model.config.vocab_size}")
    log.info("loaded %s (%s) with tokenizer %s", path, "run" if is_run_dir(path) else "HF", tokenizer_path)
    return model, loaded_tokenizer


def require_tokenizer(tokenizer: Tokenizer | None, path: str) -> Tokenizer:
    if tokenizer is None:
        raise ValueError(f"no tokenizer found for {path}: pass --tokenizer (a SentencePiece .model file)")
    return tokenizer

