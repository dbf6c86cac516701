"""Run directories and their Orbax checkpoints.

    RUN/config.json              the resolved config (ConfigDict as JSON): enough to rebuild everything
    RUN/checkpoints/<step>/      one Orbax composite checkpoint per saved step, with the items
        params                   model weights (a pure dict of arrays, stacked layer layout)
        opt_state                the optimizer state
        data                     every process's Grain iterator state (one JSON file per process)
        meta                     a CheckpointMeta: step, layout, data phase, weights only, the resolved config,
                                 parent run (branches, imports)
    RUN/checkpoints/<step>.unreadable-<time>/   a step that failed to restore, set aside by a resume
    RUN/train.lock               names the process training the run (host, pid, start time) while it holds it
                                 (local run directories only: object storage has no locks)
    RUN/tokenizer.model, RUN/data_sources.json   what the run was made from (inputs.py)
    RUN/metrics.jsonl, RUN/tensorboard/

RUN may be a local path or a gs:// or s3:// URL (storage.py; Orbax reaches buckets through tensorstore, s3://
through orbax_s3.py).
Weights are their own item so that export, evaluation and generation restore only them. Orbax writes
each step into a temporary folder and renames it when the save commits (in a bucket, where a rename is a
copy, it writes the step's commit_success.txt last instead), so a crash in the middle of a save, or a full
disk, leaves no step that `latest_step` would pick up: the previous checkpoint stays
the latest, and retention deletes old steps only after a newer one has committed. A resume skips a
committed step that no longer restores (a truncated or deleted file) for the newest one that does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from minicpm_jax import config as config_lib
from minicpm_jax import storage
from minicpm_jax.files import read_json
from minicpm_jax.model.transformer import MiniCPM
from minicpm_jax.run import inputs, integrity, orbax_s3

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
PARAMS_LAYOUT = "stacked-v1"  # layers stacked on a leading axis; recorded so a future layout can convert
PHASES = ("stable", "decay")
_LEGACY_WEIGHTS_ONLY_PHASE = "imported"  # how checkpoints written before CheckpointMeta marked weights only
LOCK_FILE = "train.lock"

log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """A run directory is missing, empty, lacks the requested step, or is being trained by another process."""


class UnreadableCheckpointError(RunDirError):
    """A committed checkpoint does not restore (a truncated or missing file), or no checkpoint of a run does."""


class CheckpointSaveError(OSError):
    """A save failed (a full disk, ...): the run stops, and its latest committed checkpoint is unchanged."""


def is_run(workdir: str) -> bool:
    """Whether `workdir` (a local path or a URL) already holds a run: its config.json."""
    return storage.is_file(storage.join(workdir, CONFIG_FILE))


def start_creation(workdir: str) -> None:
    """Makes way for creating a run in `workdir` (branch, import-hf, upcycle), which saves its checkpoint before
    config.json: checkpoints without a config.json are what an interrupted creation left, so they are removed
    and the creation is redone."""
    leftover = storage.join(workdir, CHECKPOINT_DIR)
    if not is_run(workdir) and storage.exists(leftover):
        log.warning("%s holds checkpoints but no %s: an earlier creation of this run was interrupted before it "
                    "finished; removing %s and creating the run again", workdir, CONFIG_FILE, leftover)
        storage.remove_tree(leftover)


def write_run_config(workdir: str, cfg: ml_collections.ConfigDict, inherited_tokenizer: str | None = None) -> None:
    """Writes RUN/config.json, after what the run is made from (inputs.py: its tokenizer, its data's hashes);
    `inherited_tokenizer` is the tokenizer of the run's source (a run, an HF folder) for a config that names none."""
    inputs.record(workdir, cfg, inherited_tokenizer)
    storage.write_text(storage.join(workdir, CONFIG_FILE), cfg.to_json(indent=2, sort_keys=True) + "\n")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config, validated; its data.tokenizer is the run's own copy where it holds one (inputs.py)."""
    if not is_run(workdir):
        raise RunDirError(f"{workdir} is not a run directory: {CONFIG_FILE} is missing")
    cfg = config_lib.validate(ml_collections.ConfigDict(read_json(storage.join(workdir, CONFIG_FILE))))
    copy = inputs.tokenizer_copy(workdir)
    if copy and "data" in cfg:
        cfg.data.tokenizer = copy
    return cfg


@dataclasses.dataclass
class _IteratorStateSnapshot:
    """Hands a data-iterator state to Grain's Orbax handler (which writes one file per process).

    The state is captured when the save starts, so an asynchronous save never sees a later position.
    """

    state: dict[str, Any] | None = None

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by Grain's handler after a restore; nothing to prefetch
        pass


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """The `meta` item of a checkpoint.

    - `phase`: the data and schedule phase of the step ("stable" or "decay"; a weights-only import is "stable");
    - `weights_only`: the checkpoint has no optimizer state (import-hf, upcycle, a fine-tuning start). It is
      the one mark of that: `RunCheckpoints.save` refuses a meta that disagrees with its opt_state, and
      `restore` reads the opt_state item exactly when it is False;
    - `config`: the resolved run config the step was trained with (None for a weights-only import);
    - `parent`: where the state came from ({"run": dir, "step": n, ...}) for a branch or an import, else None;
    - `progress`: the training loop's tokens seen, training time and open log window (train/progress.py), so a
      resumed run or a branch continues them; None for a weights-only checkpoint;
    - `data_sources`: the sha256 of the manifest of every prepared folder the step was trained on.
    """

    step: int
    phase: str
    weights_only: bool
    config: dict[str, Any] | None = None
    parent: dict[str, Any] | None = None
    layout: str = PARAMS_LAYOUT
    progress: dict[str, Any] | None = None
    data_sources: dict[str, str] | None = None

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"checkpoint phase {self.phase!r} is not one of {PHASES}")

    @classmethod
    def weights(cls, step: int, parent: dict[str, Any] | None = None) -> CheckpointMeta:
        """The meta of a weights-only checkpoint (no optimizer state, no data position, no training config)."""
        return cls(step, "stable", weights_only=True, parent=parent)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> CheckpointMeta:
        """Reads `to_json`'s form, and the untyped dict of older checkpoints: there a weights-only checkpoint
        had the phase "imported" (and no opt_state item), and the config and parent were left out when absent."""
        phase = meta["phase"]
        weights_only = meta.get("weights_only", phase == _LEGACY_WEIGHTS_ONLY_PHASE)
        return cls(step=int(meta["step"]), phase="stable" if phase == _LEGACY_WEIGHTS_ONLY_PHASE else phase,
                   weights_only=bool(weights_only), config=meta.get("config"), parent=meta.get("parent"),
                   layout=meta.get("layout", PARAMS_LAYOUT), progress=meta.get("progress"),
                   data_sources=meta.get("data_sources"))


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any  # None exactly when meta.weights_only
    data_state: dict[str, Any] | None
    meta: CheckpointMeta


@dataclasses.dataclass(frozen=True)
class Retention:
    """Which steps survive a save (an Orbax preservation policy; Orbax deletes the others once it commits).

    - the latest `keep_last` of the regular steps, those divisible by `every_steps` (all steps when None);
    - every step divisible by `keep_every_steps`, permanently, so stable-phase checkpoints stay branchable;
    - the latest step whatever it is. A save off the regular cadence (checkpoint.every_minutes, a stop
      request) is a resume point only, replaced by the next save.
    """

    keep_last: int
    keep_every_steps: int = 0
    every_steps: int | None = None

    def _regular(self, step: int) -> bool:
        return self.every_steps is None or step % self.every_steps == 0

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        steps = [info.step for info in checkpoints]  # Orbax passes them oldest first
        recent = set([step for step in steps if self._regular(step)][-self.keep_last:])
        return [step in recent or bool(self.keep_every_steps and step % self.keep_every_steps == 0)
                or index == len(steps) - 1 for index, step in enumerate(steps)]


class RunCheckpoints:
    """Saves and restores the checkpoints of one run; which ones it keeps is `Retention`'s rule."""

    def __init__(self, workdir: str, keep_last: int = 3, keep_every_steps: int = 0, async_save: bool = True,
                 every_steps: int | None = None):
        directory = storage.absolute(storage.join(workdir, CHECKPOINT_DIR))
        if storage.scheme(directory) == "s3":
            orbax_s3.enable()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=Retention(keep_last, keep_every_steps, every_steps),
            enable_async_checkpointing=async_save, create=True,
            temporary_path_class=orbax_s3.temporary_path_class(directory))
        self.manager = ocp.CheckpointManager(directory, options=options)
        self.workdir = workdir
        self._saving: int | None = None  # the step of the latest save, which an asynchronous failure belongs to
        self._confirmed: int | None = None  # the latest save known to have committed

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any | None, data_state: dict[str, Any] | None,
             meta: CheckpointMeta) -> None:
        """Saves a step; a weights-only checkpoint (import-hf, upcycle) passes opt_state=None and a meta
        with weights_only=True (`CheckpointMeta.weights`), and only such a checkpoint may.

        A failed save raises CheckpointSaveError; an asynchronous one raises it here, at the next save
        (or at `wait`), still naming the step that failed.
        """
        if meta.step != step or meta.weights_only != (opt_state is None) or meta.layout != PARAMS_LAYOUT:
            raise ValueError(f"checkpoint step {step} (opt_state {'absent' if opt_state is None else 'given'}, "
                             f"layout {PARAMS_LAYOUT}) does not match its meta {meta.step=}, {meta.weights_only=}, "
                             f"{meta.layout=}")
        self.wait()
        # Checksums of what is saved, taken before the save starts (its asynchronous part reads host copies).
        checksums = {"params": integrity.array_checksums(params), "data": integrity.data_digests(data_state)}
        if opt_state is not None:
            checksums["opt_state"] = integrity.array_checksums(opt_state)
        items = {"params": ocp.args.StandardSave(params),
                 "data": grain.checkpoint.CheckpointSave(_IteratorStateSnapshot(data_state)),
                 "meta": ocp.args.JsonSave(integrity.seal(meta.to_json(), checksums))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._saving = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # tensorstore's write errors are plain ValueErrors
            raise self._save_error(step, error) from error

    def raise_if_save_failed(self) -> None:
        """Raises CheckpointSaveError now if the pending asynchronous save has already failed (cheap: the
        training loop calls it before every step, so a failure stops the step after it, not the next save)."""
        if self._saving in (None, self._confirmed) or self.manager.is_saving_in_progress():
            return
        self.wait()  # the background write is over: this returns at once, or raises its failure
        self._confirmed = self._saving

    def wait(self) -> None:
        """Blocks until the pending asynchronous save has committed; raises CheckpointSaveError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._save_error(self._saving, error) from error

    def _save_error(self, step: int | None, error: Exception) -> CheckpointSaveError:
        # The manager has already dropped from its list the steps that retention would have deleted once
        # this save committed (it never did, so they are still on disk): list the committed steps afresh.
        self.manager.reload()
        disk_full = _is_disk_full(error)
        return CheckpointSaveError(
            f"checkpoint step {step} was not saved to {self.manager.directory}: "
            f"{'the disk is full (ENOSPC): ' if disk_full else ''}{_root_cause(error)}. The latest committed "
            f"checkpoint is step {self.latest_step()}; {'free some space, then ' if disk_full else ''}"
            f"`train --workdir {self.workdir}` resumes from it")

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> Restored:
        """Every item of `step`, verified against the checksums saved with it; a weights-only checkpoint
        (import-hf, upcycle) comes back with opt_state=None. Raises UnreadableCheckpointError naming the item,
        its directory and the first tensor that differs when the step does not read back as it was saved."""
        restored, checksums = self._read(step, abstract_params, abstract_opt_state)
        failure = self._verification_failure(restored, checksums)
        if failure:
            raise UnreadableCheckpointError(failure)
        return restored

    def _read(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Restored, dict | None]:
        meta, checksums = self._restore_sealed_meta(step)
        params = self._restore_item(step, "params", ocp.args.StandardRestore(abstract_params))
        opt_state = None if meta.weights_only else self._restore_item(
            step, "opt_state", ocp.args.StandardRestore(abstract_opt_state))
        data = self._restore_item(step, "data", grain.checkpoint.CheckpointRestore(_IteratorStateSnapshot()))
        return Restored(step, params, opt_state, data.state, meta), checksums

    def _verification_failure(self, restored: Restored, checksums: dict | None) -> str | None:
        """Why `restored` is not what its step saved (collective: every process calls it), or None. A step
        saved before checksums were recorded passes unverified."""
        if checksums is None:
            return None
        problems = {"params": self._array_problem(restored.params, checksums["params"])}
        if restored.opt_state is not None:
            problems["opt_state"] = self._array_problem(restored.opt_state, checksums["opt_state"])
        saved_data = checksums["data"]
        if len(saved_data) == jax.process_count() and (
                integrity.data_digest(restored.data_state) != saved_data[jax.process_index()]):
            problems["data"] = f"process {jax.process_index()}'s data state differs from the saved one (sha256)"
        return next((self._failed_item(restored.step, item, problem) for item, problem in problems.items()
                     if problem), None)

    def _failed_item(self, step: int, item: str, problem: str) -> str:
        return f"step {step}: item {item} ({self.manager.directory / str(step) / item}) fails verification: {problem}"

    @staticmethod
    def _array_problem(tree: Any, saved: dict[str, int]) -> str | None:
        return integrity.first_mismatch(saved, integrity.array_checksums(tree))

    def restore_latest_readable(self, abstract_params: Any, abstract_opt_state: Any) -> Restored | None:
        """The newest committed step that restores on every process; None for a run without checkpoints.

        Each newer step that fails (a truncated or missing file) is logged with the reason and then set
        aside, so that the resumed run can save that step again. Each process reads its own shards and
        data file, so every process votes on each step and all of them resume the same one. Raises
        UnreadableCheckpointError with each step and its reason when no step restores.
        """
        failures: dict[int, str] = {}
        for step in reversed(self.all_steps()):
            try:
                (restored, checksums), failure = self._read(step, abstract_params, abstract_opt_state), None
            except UnreadableCheckpointError as error:
                restored, checksums, failure = None, None, str(error)
            if not _processes_where(failure is not None):  # every process read it: verify it, together
                failure = self._verification_failure(restored, checksums)
            failed_processes = _processes_where(failure is not None)
            if not failed_processes:
                self._set_aside(list(failures))
                return restored
            failures[step] = failure or (f"step {step} does not restore on process(es) {failed_processes} "
                                         f"(their logs say why)")
            log.warning("%s; trying an older checkpoint", failures[step])
        if failures:
            raise UnreadableCheckpointError(f"no checkpoint of {self.workdir} restores:\n  "
                                            + "\n  ".join(failures.values())
                                            + "\nrepair one of them (its files from a backup) or start a new --workdir")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps to <step>.unreadable-<time>: kept for inspection, no longer a step."""
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step in steps:
                path = self.manager.directory / str(step)
                aside = path.rename(path.parent / f"{step}.unreadable-{stamp}")
                log.warning("moved unreadable checkpoint step %d to %s", step, aside)
        # Every process relists the steps only after process 0 has renamed them.
        multihost_utils.sync_global_devices("minicpm_jax: unreadable checkpoints set aside")
        self.manager.reload()

    def restore_meta(self, step: int) -> CheckpointMeta:
        return self._restore_sealed_meta(step)[0]

    def _restore_sealed_meta(self, step: int) -> tuple[CheckpointMeta, dict[str, Any] | None]:
        """The meta of `step` and the checksums sealed into it (None for a checkpoint saved without)."""
        sealed = self._restore_item(step, "meta", ocp.args.JsonRestore())
        try:
            meta, checksums = integrity.open_seal(sealed, f"step {step}: item meta "
                                                          f"({self.manager.directory / str(step) / 'meta'})")
            return CheckpointMeta.from_json(meta), checksums
        except integrity.IntegrityError as error:
            raise UnreadableCheckpointError(str(error)) from None

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """The parameters of `step`, verified against their saved checksums."""
        checksums = self._restore_sealed_meta(step)[1]
        params = self._restore_item(step, "params", ocp.args.StandardRestore(abstract_params))
        problem = checksums and self._array_problem(params, checksums["params"])
        if problem:
            raise UnreadableCheckpointError(self._failed_item(step, "params", problem))
        return params

    def _restore_item(self, step: int, item: str, args: ocp.args.CheckpointArgs) -> Any:
        """One item of a committed step, read by its own Orbax handler.

        Not through CheckpointManager.restore: that ends at a barrier of all processes, which a process
        whose read failed would never reach, while `restore_latest_readable` needs every process to vote.
        """
        self._require(step)
        directory = self.manager.directory / str(step) / item
        handler = ocp.args.get_registered_handler_cls(args)()
        try:
            return handler.restore(directory, args=args)
        except Exception as error:  # tensorstore raises plain Exceptions; any failure to read makes the step unreadable
            raise UnreadableCheckpointError(f"step {step}: item {item} ({directory}) does not restore: "
                                            f"{_root_cause(error)}") from error
        finally:
            handler.close()

    def _require(self, step: int) -> None:
        steps = self.all_steps()
        if not steps:
            raise RunDirError(f"{self.workdir} has no committed checkpoint in {CHECKPOINT_DIR}/")
        if step not in steps:
            raise RunDirError(f"{self.workdir} has no checkpoint for step {step}; committed steps: {steps}")

    def close(self) -> None:
        self.manager.close()


def _processes_where(condition: bool) -> list[int]:
    """The indices of the processes where `condition` holds: the same list on every process."""
    return [int(index) for index in np.flatnonzero(multihost_utils.process_allgather(np.asarray(condition)))]


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """An error, then those it was raised from or while handling, as a Python traceback shows them."""
    while error is not None:
        yield error
        error = error.__cause__ if error.__cause__ is not None or error.__suppress_context__ else error.__context__


def _root_cause(error: BaseException) -> str:
    """The innermost error of a chain (tensorstore's names the file), capped: it may append its whole spec."""
    *_, root = _chain(error)
    message = f"{type(root).__name__}: {root}"
    return message if len(message) <= 600 else message[:600] + " ..."


def _is_disk_full(error: BaseException) -> bool:
    # Python reports ENOSPC as an errno, tensorstore only in its message.
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(e)
               for e in _chain(error))


@contextlib.contextmanager
def run_lock(workdir: str) -> Iterator[None]:
    """Holds RUN/train.lock, an exclusive flock, so that only one process at a time trains `workdir`.

    A second one gets a RunDirError naming the holder (host, pid, start time), which the file records.
    The kernel releases a flock when its holder exits, however it dies (kill -9 included), so a lock
    file left by a dead process never blocks. The file itself stays: deleting it would let two
    processes hold locks on two different files of the same name.

    Object storage has no locks, and a lock object would outlive a killed holder and block its resume, so a
    run directory on gs:// or s3:// is not locked: one job per run directory in a bucket is the user's to keep.
    """
    if storage.is_remote(workdir):
        log.info("%s is on object storage, which has no file locks: no other job may train it meanwhile", workdir)
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "a+") as lock:  # "a+": opening must not erase the holder's details before we know we hold it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that has not written its details yet"
            raise RunDirError(f"{workdir} is already being trained by {holder} (it holds {path}); "
                              f"stop that run first, or train another --workdir") from None
        lock.truncate(0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        lock.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)  # nobody holds it now; closing the file releases the flock


def abstract_params(model_cfg: Any) -> tuple[nnx.GraphDef, Any]:
    """The model's graph and its parameters' shapes on this process's first device (nothing allocated).

    Naming the device lets a checkpoint saved on any mesh, by any number of processes, restore here.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MiniCPM(model_cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                  nnx.to_pure_dict(state))


def restore_model(workdir: str, step: int | None = None) -> tuple[MiniCPM, ml_collections.ConfigDict]:
    """Rebuilds a run's model from its config and the `params` item of `step` (default: the latest)."""
    cfg = read_run_config(workdir)
    checkpoints = RunCheckpoints(workdir, async_save=False)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise RunDirError(f"{workdir} has no committed checkpoint in {CHECKPOINT_DIR}/")
        graphdef, abstract = abstract_params(cfg.model)
        params = checkpoints.restore_params(step, abstract)
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, params), cfg


def save_model(workdir: str, step: int, model: MiniCPM, parent: dict[str, Any] | None = None) -> None:
    """Writes a model as a weights-only checkpoint `step` of a run (import-hf, upcycling, fine-tuning).

    `parent` ({"run": dir, "step": n}) records where the weights came from.
    """
    checkpoints = RunCheckpoints(workdir, async_save=False)
    try:
        checkpoints.save(step, nnx.to_pure_dict(nnx.state(model, nnx.Param)), None, None,
                         CheckpointMeta.weights(step, parent or None))
        checkpoints.wait()
    finally:
        checkpoints.close()
