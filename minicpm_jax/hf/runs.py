"""A run directory from an HF folder (`import-hf`) and an HF folder from a run (`export-hf`), tokenizer included.

Either side may be a local folder or a gs:// or s3:// URL. An export checks every input (the checkpoint, the
layout and dtype, the target folder, the tokenizer) before it writes its first file, so a failed export leaves
no half-written folder behind.
"""

from __future__ import annotations

import logging

import ml_collections

from minicpm_jax import storage
from minicpm_jax.hf.config import hf_config_from_model
from minicpm_jax.hf.convert import check_remote_code, load_hf, save_hf, stale_checkpoint
from minicpm_jax.hf.tokenizer import HF_TOKENIZER_FILE, check_hf_tokenizer, save_hf_tokenizer
from minicpm_jax.run import checkpoint, inputs

log = logging.getLogger(__name__)


def import_run(hf_dir: str, workdir: str, param_dtype: str = "float32") -> None:
    """Writes the model of `hf_dir` as step 0 of the new run `workdir`, with a copy of the folder's tokenizer.model
    (the weights before config.json: a crash in between leaves no run that looks complete)."""
    if checkpoint.is_run(workdir):
        raise FileExistsError(f"{workdir} is already a run directory; import into a new one")
    model, model_cfg = load_hf(hf_dir, param_dtype=param_dtype)
    tokenizer = storage.join(hf_dir, HF_TOKENIZER_FILE)
    if not storage.is_file(tokenizer):
        log.warning("%s has no %s: the run holds no tokenizer (generate and export-hf will need --tokenizer)",
                    hf_dir, HF_TOKENIZER_FILE)
        tokenizer = None
    # The run records the model it holds; training settings come from the config given when it is trained.
    checkpoint.start_creation(workdir)
    checkpoint.save_model(workdir, 0, model)
    checkpoint.write_run_config(workdir, ml_collections.ConfigDict({"model": model_cfg.to_dict()}), tokenizer)
    log.info("imported %s into run %s (step 0)", hf_dir, workdir)


def export_run(workdir: str, out: str, *, step: int | None = None, arch: str = "minicpm", dtype: str = "float32",
               overwrite: bool = False, tokenizer: str | None = None, remote_code: bool = False) -> list[str]:
    """Writes checkpoint `step` (default: the latest) of `workdir` to the HF folder `out`; returns the file names.

    The tokenizer is `tokenizer`, else the run's own (inputs.run_tokenizer); a run without one exports its
    weights alone, with a warning.
    """
    model, cfg = checkpoint.restore_model(workdir, step)
    hf_config_from_model(model.config, arch, dtype)
    check_remote_code(model.config, arch, remote_code)
    stale_checkpoint(out, overwrite)
    tokenizer_path = tokenizer or inputs.run_tokenizer(workdir, cfg)
    checked = check_hf_tokenizer(tokenizer_path, model.config.vocab_size) if tokenizer_path else None
    files = save_hf(model, None, out, arch=arch, dtype=dtype, overwrite=overwrite, remote_code=remote_code)
    if checked:
        files += save_hf_tokenizer(checked, out, model.config.max_position_embeddings, arch=arch)
    else:
        log.warning("%s holds no %s and records no data.tokenizer: exported the weights only; pass --tokenizer "
                    "to export tokenizer files and the chat template", workdir, inputs.TOKENIZER_FILE)
    log.info("exported %s to %s: %s", workdir, out, ", ".join(files))
    return files
