"""Training metrics: FLOPs and MFU accounting, and one writer for metrics.jsonl, TensorBoard and the log.

MFU = achieved model FLOPs / (devices × peak FLOPs per device). Model FLOPs per token follow the PaLM
appendix: 6·N for the weight matmuls (forward and backward) plus 12·L·T·d for the attention scores
and their use (no discount for causality), where N counts every matmul weight, including the LM
head (V·d, tied or not) but not the embedding lookup. Rematerialised recomputation does not count:
MFU measures useful work, not hardware utilisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any

import jax

from minicpm_jax import storage
from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.parallel import devices

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every layer's projections plus the LM head."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attention = d * cfg.num_heads * cfg.head_dim * 2 + d * cfg.num_kv_heads * cfg.head_dim * 2
    return L * (attention + 3 * d * f) + cfg.vocab_size * d


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6·N + 12·L·T·d: forward + backward FLOPs of one training token at sequence length T."""
    return 6 * matmul_params(cfg) + 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def peak_flops_per_device(configured: float) -> float:
    """The configured peak, else the known peak of this device kind (parallel/devices.py), else 0 (MFU is then
    not reported)."""
    if configured > 0:
        return configured
    device = devices.from_kind(jax.devices()[0].device_kind)
    return device.peak_flops if device else 0.0


def total_peak_flops(configured: float) -> float:
    """Peak FLOP/s of all devices together (`peak_flops_per_device` × device count); 0 when unknown."""
    return peak_flops_per_device(configured) * jax.device_count()


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float | None:
    """Model FLOPs utilisation = tokens/s × FLOPs/token / peak FLOP/s (None without a known peak).

    The training log and every benchmark call this with `train_flops_per_token` and `total_peak_flops`,
    so their MFU figures are the same quantity.
    """
    return tokens_per_sec * flops_per_token / peak_flops if peak_flops > 0 else None


class MetricsWriter:
    """Appends one JSON line per logged step to RUN/metrics.jsonl and mirrors scalars to TensorBoard and W&B.

    Every line carries the step and `time` (Unix seconds). On object storage the file is uploaded again at
    most every 30 s and at every `flush`, which the loop calls before each checkpoint save, so every step a
    checkpoint holds has its line (storage.TextLog). TensorBoard writes gs:// and s3:// event files itself
    (tensorboardX), with tags grouped as train/, eval/ and moe/ and the run's config as text and hparams.
    W&B (`train.wandb_project`, the `wandb` extra) gets the same scalars under the same tags, in one W&B run
    per run directory that a resumed run continues.
    """

    def __init__(self, workdir: str, enabled: bool = True, config: dict[str, Any] | None = None,
                 wandb_project: str = ""):
        self.enabled = enabled
        self.path = storage.join(workdir, METRICS_FILE)
        self._log = storage.TextLog(self.path) if enabled else None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(storage.join(workdir, "tensorboard"))
        except ImportError:
            log.warning("tensorboardX is not installed: no TensorBoard events "
                        "(pip install 'minicpm-jax[tensorboard]'); metrics.jsonl is still written")
        if self._tensorboard is not None and config is not None:
            _write_config_to_tensorboard(self._tensorboard, config)
        if wandb_project:
            self._wandb = _start_wandb(wandb_project, workdir, config)

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after `step`: a resumed run recomputes them, and must not log them twice."""
        if self.enabled and self._log.lines:
            self._log.replace([line for line in self._log.lines if line.strip() and json.loads(line)["step"] <= step])

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in values.items()}}
        self._log.append(json.dumps(record) + "\n")
        scalars = {tag(key): value for key, value in record.items()
                   if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value)}
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def flush(self) -> None:
        """Makes every line written so far durable (on object storage: uploads the file)."""
        if self.enabled:
            self._log.flush()

    def close(self) -> None:
        self.flush()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def tag(key: str) -> str:
    """The TensorBoard / W&B name of a metrics.jsonl key: eval_loss -> eval/loss, moe_load_balance ->
    moe/load_balance, a key already grouped (dyn/curvature) as it is, everything else under train/."""
    if "/" in key:
        return key
    for prefix in ("eval", "moe"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 10}} -> {"train.steps": 10}: the hyperparameters as TensorBoard and W&B list them."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _write_config_to_tensorboard(writer: Any, config: dict[str, Any]) -> None:
    """The resolved config as a text panel, and its scalar entries as hparams against the training loss."""
    from tensorboardX.summary import hparams

    writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
    scalars = {key: value for key, value in _flat(config).items() if isinstance(value, (bool, int, float, str))}
    for summary in hparams(scalars, {"train/loss": float("nan"), "eval/loss": float("nan")}):
        writer.file_writer.add_summary(summary)


def _start_wandb(project: str, workdir: str, config: dict[str, Any] | None) -> Any:
    """A W&B run for this run directory: its id derives from the directory, so a resume continues it.

    W&B reads its usual environment (WANDB_API_KEY, WANDB_ENTITY, WANDB_MODE=offline, WANDB_DIR).
    """
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(f"train.wandb_project={project!r} needs wandb: pip install 'minicpm-jax[wandb]'") from err
    run_id = hashlib.sha256(storage.absolute(workdir).encode()).hexdigest()[:16]
    local_dir = None if storage.is_remote(workdir) else workdir
    return wandb.init(project=project, id=run_id, resume="allow", name=storage.as_path(workdir).name,
                      dir=local_dir, config=_flat(config or {}))


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (numpy/jax numbers become Python floats or ints)."""
    if hasattr(value, "item"):
        value = value.item()
    return value
