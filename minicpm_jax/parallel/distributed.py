"""Multi-host start-up: one jax program per host, joined through `jax.distributed.initialize()`.

Three ways in, in this order:
1. explicit: `--coordinator-address HOST:PORT --num-processes N --process-id I`, or the environment
   variables MINICPM_COORDINATOR_ADDRESS, MINICPM_NUM_PROCESSES, MINICPM_PROCESS_ID (how the local
   multi-process tests and `launch/local_multiprocess.sh` start CPU jobs);
2. auto-detected clusters: TPU VM pods (several workers) and SLURM jobs with several tasks, for which
   jax finds the coordinator itself;
3. otherwise a single process, and nothing is initialised.

The coordination service ends every process with an error naming the dead one when a process sends no
heartbeat for the heartbeat timeout (MINICPM_HEARTBEAT_TIMEOUT seconds, default 100), so a lost host
stops the job instead of leaving the others waiting in a collective forever.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MINICPM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MINICPM_NUM_PROCESSES"
ENV_PROCESS_ID = "MINICPM_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "MINICPM_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT = 100  # seconds, jax's default


def _cluster_detected() -> str | None:
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU pod"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int | None = None) -> None:
    """Joins this process to a multi-host job when one is configured or detected; a no-op otherwise."""
    if heartbeat_timeout is None:
        heartbeat_timeout = int(os.environ.get(ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT))
    if heartbeat_timeout < 1:
        raise ValueError(f"--heartbeat-timeout must be at least 1 second, got {heartbeat_timeout}")
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("a multi-process job needs all of --coordinator-address, --num-processes and --process-id "
                         f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got {explicit}")
    if coordinator_address is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
        # CPU processes exchange collectives through gloo (the default CPU backend has none across processes).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    elif (cluster := _cluster_detected()) is not None:
        log.info("%s detected: joining the multi-host job", cluster)
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
    else:
        return
    log.info("process %d of %d: %d local and %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    if jax.process_index() != 0:  # progress lines and metrics come from process 0 only
        logging.getLogger("minicpm_jax").setLevel(logging.WARNING)
