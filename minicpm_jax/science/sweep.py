"""Sweeps: many short runs over a grid or a random sample of config settings, collected into one table.

    SWEEP/sweep.json               the sweep: its base config resolved (file + base overrides, as data), every
                                   point's settings
    SWEEP/points/<name>/           one ordinary run directory per point (resumable like any run)
    SWEEP/points/<name>/result.json  written when the point finished (or diverged): the completion marker
    SWEEP/points/<name>/interrupted.json  the step at which a stop request (Ctrl-C, SIGTERM) saved it
    SWEEP/results.jsonl, results.csv  the table, rebuilt from the result.json files

A stop request stops the whole sweep once the running point has saved; that point is recorded as
interrupted, never as finished. Resuming a sweep skips points with a result.json; an interrupted or
crashed point resumes from its own latest checkpoint and finishes. Several processes split the points by index
(`shard i/k`), each writing only its own
points' files, so they never contend for a file. Points that share every compiled shape reuse XLA
executables through JAX's persistent compilation cache in SWEEP/.jax_cache (the learning rate is a
constant of the compiled step, so an lr sweep recompiles per point).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from minicpm_jax import config as config_lib
from minicpm_jax import storage
from minicpm_jax.config import ConfigError
from minicpm_jax.files import read_json, write_json
from minicpm_jax.progress import Ticker
from minicpm_jax.science import results as results_lib
from minicpm_jax.science.shapes import PSEUDO_KEYS, apply_pseudo_key

log = logging.getLogger(__name__)

SPEC_FILE = "sweep.json"
RESULT_FILE = "result.json"
INTERRUPTED_FILE = "interrupted.json"
POINTS_DIR = "points"


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    settings: dict[str, Any]  # config key (or pseudo-key shape/width) -> value

    @property
    def name(self) -> str:
        """A readable directory name from the settings, e.g. width-128_schedule.peak_lr-0.01."""
        text = "_".join(f"{key}-{_format(value)}" for key, value in self.settings.items())
        return re.sub(r"[^A-Za-z0-9._-]", "", text) or "base"


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def grid(axes: dict[str, Sequence[Any]]) -> list[SweepPoint]:
    """The cartesian product of the axes, in order (the last axis varies fastest)."""
    keys = list(axes)
    return [SweepPoint(dict(zip(keys, values))) for values in itertools.product(*(axes[k] for k in keys))]


def random_search(space: dict[str, tuple], samples: int, seed: int = 0) -> list[SweepPoint]:
    """`samples` points drawn from `space`: key -> ("log", low, high) | ("linear", low, high) | ("choice", *values)."""
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(samples):
        settings = {}
        for key, (kind, *args) in space.items():
            if kind == "log":
                settings[key] = float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
            elif kind == "linear":
                settings[key] = float(rng.uniform(args[0], args[1]))
            elif kind == "choice":
                settings[key] = args[int(rng.integers(len(args)))]
            else:
                raise ConfigError(f"random-search dimension {key}: kind {kind!r} must be log, linear or choice")
        points.append(SweepPoint(settings))
    return points


def point_config(base: str | Mapping[str, Any], base_overrides: Sequence[str], point: SweepPoint
                 ) -> ml_collections.ConfigDict:
    """The base config with the base overrides, then the point's settings (pseudo-keys first), validated.

    `base` is a config file, or a resolved config as data (a sweep's recorded base: no code runs)."""
    if isinstance(base, str):
        cfg = config_lib.load(base, base_overrides)
    else:
        cfg = ml_collections.ConfigDict(copy.deepcopy(dict(base)))
        config_lib.apply_overrides(cfg, base_overrides)
    for key, value in point.settings.items():
        if key in PSEUDO_KEYS:
            apply_pseudo_key(cfg, key, value)
    config_lib.apply_overrides(cfg, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                     for k, v in point.settings.items() if k not in PSEUDO_KEYS])
    return config_lib.validate(cfg)


class Sweep:
    """A sweep: its points and its base config, resolved once when the sweep is made (the config file with the
    base overrides, paths made absolute) and recorded as data in sweep.json. Resuming reads that record; the
    config file is not run again, so a resumed sweep runs no stored code and means the same in any directory."""

    def __init__(self, sweep_dir: str, config_path: str, points: Sequence[SweepPoint],
                 base_overrides: Sequence[str] = (), base_config: Mapping[str, Any] | None = None):
        names = [p.name for p in points]
        if len(set(names)) != len(names):
            raise ConfigError(f"sweep points must differ; duplicate settings among {names}")
        self.dir, self.config_path = sweep_dir, config_path
        self.points, self.base_overrides = list(points), list(base_overrides)
        if base_config is None:
            base_config = json.loads(config_lib.load(config_path, base_overrides).to_json())
        self.base_config = dict(base_config)

    @classmethod
    def load(cls, sweep_dir: str) -> Sweep:
        """The sweep recorded in `sweep_dir` (to resume it or to read its table), from its record alone."""
        path = storage.join(sweep_dir, SPEC_FILE)
        if not storage.is_file(path):
            raise ConfigError(f"{sweep_dir} holds no sweep ({SPEC_FILE} is missing)")
        spec = read_json(path)
        if "base_config" not in spec:
            raise ConfigError(f"{path} was written by an older minicpm-jax: it names the Python config "
                              f"{spec.get('config')} instead of recording it, and a resume runs no stored code. "
                              f"Continue it with `sweep --config {spec.get('config')} --out {sweep_dir}` and the same "
                              f"--grid/--random and overrides: finished points are kept")
        return cls(sweep_dir, spec["config"], [SweepPoint(s) for s in spec["points"]], spec["base_overrides"],
                   base_config=spec["base_config"])

    def point_config(self, point: SweepPoint) -> ml_collections.ConfigDict:
        return point_config(self.base_config, (), point)

    def _spec(self) -> dict[str, Any]:
        return {"config": self.config_path, "base_overrides": self.base_overrides,
                "points": [p.settings for p in self.points], "base_config": self.base_config}

    def record(self) -> None:
        """Writes sweep.json, or checks that the one already there describes this same sweep (an older record,
        without the base config, is completed)."""
        path = storage.join(self.dir, SPEC_FILE)
        if storage.is_file(path):
            stored, mine = read_json(path), json.loads(json.dumps(self._spec()))
            if "base_config" not in stored:
                mine.pop("base_config")
            if stored != mine:
                raise ConfigError(f"{self.dir} already holds another sweep ({SPEC_FILE} differs); resume it with "
                                  f"the same settings or use a new sweep directory")
            if "base_config" not in stored:
                write_json(path, self._spec(), indent=1)
            return
        from minicpm_jax.run.plan import plan_run

        for point in self.points:  # every point's config must be valid before the first run starts
            plan_run(self.point_config(point))
        write_json(path, self._spec(), indent=1)

    def point_dir(self, point: SweepPoint) -> str:
        return storage.join(self.dir, POINTS_DIR, point.name)

    def done(self, point: SweepPoint) -> bool:
        return storage.is_file(storage.join(self.point_dir(point), RESULT_FILE))

    def run(self, shard: int = 0, num_shards: int = 1) -> None:
        """Trains this shard's unfinished points one after another (completed ones are skipped)."""
        from minicpm_jax.train import loop as train_lib
        from minicpm_jax.train.step_decisions import TrainingStopped

        self.record()
        _enable_compilation_cache(storage.join(self.dir, ".jax_cache"))
        mine = [p for i, p in enumerate(self.points) if i % num_shards == shard]
        # A line after each trained point: how many are left and, at the pace so far, how long they will take.
        ticker = Ticker("sweep", sum(not self.done(point) for point in mine), "points", every_seconds=0)
        for index, point in enumerate(mine, 1):
            if self.done(point):
                log.info("sweep point %d/%d %s: done, skipped", index, len(mine), point.name)
                continue
            workdir = self.point_dir(point)
            interrupted = storage.join(workdir, INTERRUPTED_FILE)
            log.info("sweep point %d/%d %s%s", index, len(mine), point.name,
                     " (interrupted before: resuming it)" if storage.is_file(interrupted) else "")
            cfg = train_lib.prepare_workdir(workdir, self.point_config(point))
            status = "done"
            try:
                train_lib.train(cfg, workdir)
            except FloatingPointError as err:  # a diverged lr is a result of an lr sweep, not a failure of it
                log.warning("sweep point %s diverged: %s", point.name, err)
                status = "diverged"
            except TrainingStopped as stopped:  # the point is unfinished, and the user asked the sweep to stop
                write_json(interrupted, {"step": stopped.step, "reason": stopped.reason}, indent=1)
                raise TrainingStopped(workdir, stopped.step, f"{stopped.reason} in sweep point {point.name}",
                                      resume=f"sweep --resume {self.dir}") from None
            result = {"point": point.name, "settings": point.settings, "status": status,
                      **results_lib.read_run(workdir).to_dict()}
            write_json(storage.join(workdir, RESULT_FILE), result, indent=1)
            if storage.is_file(interrupted):
                storage.remove(interrupted)
            ticker.update()

    def table(self) -> list[dict[str, Any]]:
        """One row per finished point, in sweep order."""
        rows = []
        for point in self.points:
            path = storage.join(self.point_dir(point), RESULT_FILE)
            if storage.is_file(path):
                rows.append(read_json(path))
        return rows

    def write_table(self) -> list[dict[str, Any]]:
        """Writes results.jsonl and results.csv (settings as their own columns) and returns the rows."""
        rows = self.table()
        storage.write_text(storage.join(self.dir, "results.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
        flat = [{**row["settings"], **{k: v for k, v in row.items() if k != "settings"}} for row in rows]
        columns = list(dict.fromkeys(key for row in flat for key in row))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
        storage.write_text(storage.join(self.dir, "results.csv"), table.getvalue())
        return rows


def _enable_compilation_cache(cache_dir: str) -> None:
    import jax

    if not jax.config.jax_compilation_cache_dir:  # a cache the user configured wins
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        # Tiny sweep models compile in well under the default 1 s threshold, and there are many of them.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """`key=v1,v2,...` -> (key, [values]) with values parsed as Python literals (else strings)."""
    if "=" not in text:
        raise ConfigError(f"sweep axis {text!r} is not of the form key=v1,v2,...")
    key, raw = text.split("=", 1)
    return key.strip(), [config_lib._parse_value(v.strip()) for v in raw.split(",") if v.strip()]


def parse_dimension(text: str) -> tuple[str, tuple]:
    """`key=log:1e-3:1e-1` | `key=linear:0:1` | `key=choice:a,b` -> (key, (kind, *args))."""
    key, _, spec = text.partition("=")
    kind, _, rest = spec.partition(":")
    if kind in ("log", "linear"):
        low, _, high = rest.partition(":")
        return key.strip(), (kind, float(low), float(high))
    if kind == "choice":
        return key.strip(), ("choice", *(config_lib._parse_value(v) for v in rest.split(",")))
    raise ConfigError(f"random dimension {text!r} must be key=log:LOW:HIGH, key=linear:LOW:HIGH or key=choice:A,B")


def run_points(sweep: Sweep, processes: int = 1, extra_args: Iterable[str] = ()) -> None:
    """Runs the sweep in this process, or in `processes` subprocesses that split the points."""
    import subprocess
    import sys

    if processes <= 1:
        sweep.run()
        return
    sweep.record()
    commands = [[sys.executable, "-m", "minicpm_jax.cli", "sweep", "--resume", sweep.dir,
                 "--shard", f"{i}/{processes}", *extra_args] for i in range(processes)]
    children = [subprocess.Popen(cmd) for cmd in commands]
    failed = [cmd for cmd, child in zip(commands, children) if child.wait() != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} sweep process(es) failed: {' '.join(failed[0])}")
