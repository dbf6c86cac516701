"""Peak memory of `prepare-data` on one long single-line document, this checkout against an older one (issue 22).

The script writes a single-line text file of `--mb` MB (Zipf-distributed made-up words with digits, punctuation,
Chinese and emoji, one document), trains a 4000-piece tokenizer on a sample of the same generator, and runs
`minicpm-jax prepare-data` on it in a subprocess, once per code version: this checkout and, with `--before REF`,
the package as it is at git ref REF (extracted with `git archive`). Each run's peak RSS comes from `os.wait4`, so
every child is measured on its own; a run on a 1 KB document gives each version's floor (interpreter, imports).
The target is that prepare-data stays under about 4x the document's token ids (int32 bytes) above that floor.
When both versions ran, the script checks that they wrote the same shards (sha256 in the manifests).

    python benchmarks/prepare_memory.py --before issue21tok        # 50 MB; about 3 min on 2 vCPUs
    python benchmarks/prepare_memory.py --mb 200 --json mem.json   # this checkout only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import _report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=50.0, help="size of the single-line document in MB")
    p.add_argument("--before", help="git ref whose minicpm_jax package is measured too, side by side")
    p.add_argument("--tokenizer", help="a SentencePiece model to use (default: train a 4000-piece one)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def _lexicon(rng: np.random.Generator, size: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, len(letters) + 1)
    words = ["".join(rng.choice(letters, size=rng.integers(1, 10), p=freq / freq.sum())) for _ in range(size)]
    words += list("模型学习数据你好世界今天天气") + ["😀", "🎉", ",", ".", "(", ")", "1984", "42", "3.14", "\t"]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    return np.array(words, dtype=object), zipf / zipf.sum()


def _words(rng, lexicon, n: int) -> str:
    words, p = lexicon
    return " ".join(words[rng.choice(len(words), size=n, p=p)])


def write_document(path: str, mb: float, seed: int = 0) -> int:
    """A single-line text file of about `mb` MB; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    lexicon = _lexicon(rng)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            piece = _words(rng, lexicon, 200_000) + " "
            f.write(piece)
            size += len(piece.encode("utf-8"))
    return size


def train_tokenizer(out_dir: str) -> str:
    from minicpm_jax.data import tokenizer

    rng = np.random.default_rng(1)
    lexicon = _lexicon(np.random.default_rng(0))
    docs = [_words(rng, lexicon, 50) for _ in range(20_000)]
    return str(tokenizer.train_tokenizer(docs, 4000, os.path.join(out_dir, "tok")))


def run_prepare(code_root: str, document: str, tokenizer: str, out: str) -> dict:
    """Runs prepare-data from the package under `code_root` in a child; its peak RSS, seconds and manifest."""
    env = {**os.environ, "PYTHONPATH": code_root, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "minicpm_jax.cli", "prepare-data", "--input", document, "--tokenizer", tokenizer,
           "--out", out]
    started = time.perf_counter()
    # In code_root: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH.
    child = subprocess.Popen(cmd, env=env, cwd=code_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"prepare-data from {code_root} failed ({child.returncode}): {stderr.decode()[-2000:]}")
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    return {"peak_rss_mb": usage.ru_maxrss / 1e3, "seconds": seconds, "num_tokens": manifest["num_tokens"],
            "shards": [s["sha256"] for s in manifest["shards"]]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="prepare-memory-")
    codes = {"after": REPO}
    if args.before:
        before = os.path.join(tmp.name, "before")
        os.makedirs(before)
        archive = subprocess.run(["git", "-C", REPO, "archive", args.before, "minicpm_jax"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        codes = {"before": before, **codes}
    tokenizer = args.tokenizer or train_tokenizer(tmp.name)
    document = os.path.join(tmp.name, "document.txt")
    small = os.path.join(tmp.name, "small.txt")
    num_bytes = write_document(document, args.mb)
    write_document(small, 0.001, seed=1)

    runs = {}
    for name, root in codes.items():
        floor = run_prepare(root, small, tokenizer, os.path.join(tmp.name, f"{name}-small"))
        run = run_prepare(root, document, tokenizer, os.path.join(tmp.name, f"{name}-big"))
        ids_mb = run["num_tokens"] * 4 / 1e6
        run.update(floor_rss_mb=floor["peak_rss_mb"], ids_mb=ids_mb,
                   above_floor_per_ids=(run["peak_rss_mb"] - floor["peak_rss_mb"]) / ids_mb,
                   peak_per_input=run["peak_rss_mb"] * 1e6 / num_bytes)
        runs[name] = run
    identical = len({tuple(r["shards"]) for r in runs.values()}) == 1 if len(runs) > 1 else None
    result = {"cpu": _report.cpu_summary(), "input_mb": num_bytes / 1e6, "tokenizer": tokenizer if args.tokenizer
              else "trained, 4000 pieces", "before": args.before, "runs": runs, "identical_shards": identical,
              "load_average": os.getloadavg()[0]}
    print(f"CPU: {result['cpu']}; 1-min load average {result['load_average']:.1f}")
    run = runs["after"]
    print(f"one single-line document of {num_bytes / 1e6:.1f} MB, {run['num_tokens']:,} tokens "
          f"({num_bytes / run['num_tokens']:.2f} bytes/token), ids {run['ids_mb']:.1f} MB as int32")
    print(f"  {'code':<22}{'peak RSS':>10}{'floor':>8}{'(peak-floor)/ids':>18}{'peak/input':>12}{'seconds':>9}")
    for name, run in runs.items():
        label = f"{name} ({args.before})" if name == "before" else f"{name} (this checkout)"
        print(f"  {label:<22}{run['peak_rss_mb']:>8.0f}MB{run['floor_rss_mb']:>6.0f}MB"
              f"{run['above_floor_per_ids']:>17.2f}x{run['peak_per_input']:>11.2f}x{run['seconds']:>9.1f}")
    if identical is not None:
        print(f"  shards identical: {identical}")
    _report.write_json(args.json, result)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
