"""Checks our exports on another transformers, in a second Python environment: typically 4.40–4.48, where
OpenBMB's MiniCPM code runs, while our `convert` extra installs 5.x.

    python -m minicpm_jax.hf.old_transformers_check --python /tmp/tf448/bin/python [--out DIR]

This side (our environment, with JAX) trains a small tokenizer and builds tiny random runs (norm gains included),
exports each with `export-hf --arch minicpm --remote-code` and with `--arch granite`, and records our logits,
greedy continuations, token ids and chat-prompt ids in DIR/reference.json and DIR/reference.npz. Then it runs this
same file with the other Python as the client, which imports only torch, transformers and numpy: it loads each
export with AutoModelForCausalLM (`trust_remote_code=True` for the minicpm layout) and AutoTokenizer (fast and
slow), generates greedily with use_cache=True and use_cache=False, and writes DIR/client.json and client.npz.
This side compares: logits within TOLERANCE (relative max error), continuations and ids (with and without BOS,
and apply_chat_template's) equal; how each tokenizer decodes our ids is reported as a note, not checked. It
prints one line per check and exits 1 if any fails. The README (Hugging Face conversion) gives the result on 4.48.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TOLERANCE = 1e-5
GREEDY_TOKENS = 8
# Chat markers, leading/trailing spaces, newlines, CJK, and characters only byte fallback covers.
TEXTS = ["Hello world", " Hello", "  two leading spaces", "trailing space ", "a\nb\n\nc", "\nstarts with a newline",
         "你好 世界，模型在学习数据", "emoji 😀🎉 and bytes Ωß€ ①", "<用户>Hello<AI>",
         "<用户> 你好, who are you? <AI> I am\n a model", "system text<用户>2 + 2?<AI>4 😀<用户>and  3 + 3?\n<AI>",
         "<AI><AI>  x<用户>\n"]
CONVERSATIONS = [[{"role": "user", "content": "Hello"}],
                 [{"role": "user", "content": " 你好, who?"}, {"role": "assistant", "content": "I am\n a model 😀"},
                  {"role": "user", "content": "and  3 + 3?\n"}]]
_SENTENCE = ("the quick brown fox jumps over a lazy dog 模型 在 学习 数据 and 你好 世界 tokens pack rows 😀 🎉 of "
             "length Hello world who are you model")
# Tiny models: the real μP scalars; vocab above the tokenizer's so random ids cover unused rows too.
MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2,
             dim_model_base=16, max_position_embeddings=64, scale_emb=12.0, scale_depth=1.4, rms_norm_eps=1e-5)
CASES = {"dense": {},
         "moe_untied_linear": dict(num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                                   rope_scaling="linear", rope_factor=2.0),
         "dynamic_past_max_positions": dict(rope_scaling="dynamic", rope_factor=4.0, max_position_embeddings=32)}
LAYOUTS = ("minicpm", "granite")
# The tokenizers a client may use: AutoTokenizer as is, AutoTokenizer(use_fast=False) (which our
# tokenizer_config's PreTrainedTokenizerFast still serves from tokenizer.json), and the Llama classes that
# OpenBMB's MiniCPM folders name: LlamaTokenizer is the SentencePiece ("slow") one, reading tokenizer.model.
TOKENIZERS = ("AutoTokenizer", "AutoTokenizer(use_fast=False)", "LlamaTokenizer", "LlamaTokenizerFast")


# ---------------------------------------------------------------------------------------------- our side (JAX)

def _texts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    words = _SENTENCE.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def _tiny_model(overrides: dict, seed: int):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from minicpm_jax.config import ModelConfig
    from minicpm_jax.model import MiniCPM

    model = MiniCPM(ModelConfig(**{**MODEL, **overrides}), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "norm" in "/".join(map(str, path)):  # gains away from 1, so a norm applied wrongly shows
            param.set_value(jnp.asarray(1.0 + 0.3 * rng.standard_normal(param.get_value().shape), jnp.float32))
    return model


def _greedy(model, prompt, steps: int) -> list[int]:
    """`prompt` and up to `steps` argmax tokens, up to and including EOS (where transformers' generate stops)."""
    import jax.numpy as jnp
    import numpy as np

    ids = list(prompt)
    for _ in range(steps):  # full forward each step: no cache on our side
        ids.append(int(np.asarray(model(jnp.asarray([ids], jnp.int32)))[0, -1].argmax()))
        if ids[-1] == model.config.eos_token_id:
            break
    return ids


def build(out: Path) -> dict:
    """Exports every case in both layouts under `out` and writes our reference outputs; returns the reference."""
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from minicpm_jax import cli
    from minicpm_jax.data.chat import encode_chat_prompt
    from minicpm_jax.data.tokenizer import Tokenizer, train_tokenizer
    from minicpm_jax.run import checkpoint

    tok_path = train_tokenizer(_texts(300) + TEXTS, 400, out / "tok")
    tok = Tokenizer(tok_path)
    reference = {"texts": TEXTS, "conversations": CONVERSATIONS, "greedy_tokens": GREEDY_TOKENS, "exports": {},
                 "ids": [tok.encode(t) for t in TEXTS], "ids_bos": [tok.encode(t, add_bos=True) for t in TEXTS],
                 "chat_prompt_ids": [encode_chat_prompt(tok, c) for c in CONVERSATIONS],
                 "decoded": [tok.decode(tok.encode(t)) for t in TEXTS]}
    arrays = {}
    rng = np.random.default_rng(0)
    for seed, (case, overrides) in enumerate(CASES.items()):
        model = _tiny_model(overrides, seed)
        cfg = model.config
        run = out / "runs" / case
        checkpoint.save_model(str(run), 0, model)
        checkpoint.write_run_config(str(run), ml_collections.ConfigDict({"model": cfg.to_dict()}))
        # Longer than max_position_embeddings for the dynamic case (NTK scaling applies past it).
        tokens = rng.integers(0, cfg.vocab_size, size=(2, 48), dtype=np.int32)
        arrays[f"{case}/tokens"] = tokens
        arrays[f"{case}/logits"] = np.asarray(model(jnp.asarray(tokens)), np.float32)
        prompt = [int(t) for t in tokens[0, :8]]
        greedy = _greedy(model, prompt, GREEDY_TOKENS)
        text_ids = tok.encode(TEXTS[-3], add_bos=True)
        arrays[f"{case}/text_logits"] = np.asarray(model(jnp.asarray([text_ids], jnp.int32)), np.float32)
        for arch in LAYOUTS:
            name = f"{case}_{arch}"
            args = ["export-hf", "--workdir", str(run), "--out", str(out / "exports" / name), "--arch", arch,
                    "--tokenizer", str(tok_path)]
            if cli.main(args + (["--remote-code"] if arch == "minicpm" else [])) != 0:
                raise RuntimeError(f"export-hf failed: {args}")
            reference["exports"][name] = {"case": case, "arch": arch, "prompt": prompt, "greedy": greedy,
                                          "text_ids": text_ids}
    (out / "reference.json").write_text(json.dumps(reference, ensure_ascii=False, indent=1))
    np.savez(out / "reference.npz", **arrays)
    return reference


def relative_max_error(ours, theirs) -> float:
    import numpy as np

    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def compare(out: Path) -> tuple[list[str], list[str]]:
    """(report lines, failures) from DIR/reference.* and DIR/client.*."""
    import numpy as np

    reference = json.loads((out / "reference.json").read_text())
    client = json.loads((out / "client.json").read_text())
    ours, theirs = np.load(out / "reference.npz"), np.load(out / "client.npz")
    lines = ["client: " + ", ".join(f"{k} {v}" for k, v in client["versions"].items())]
    failures, errors = [], []

    def check(ok: bool, line: str) -> None:
        lines.append(("ok    " if ok else "FAIL  ") + line)
        if not ok:
            failures.append(line)

    for name, expected in reference["exports"].items():
        got = client["exports"][name]
        if "error" in got:
            check(False, f"{name}: {got['error']}")
            continue
        case = expected["case"]
        for key in ("logits", "text_logits"):
            error = relative_max_error(ours[f"{case}/{key}"], theirs[f"{name}/{key}"])
            errors.append(error)
            check(error <= TOLERANCE, f"{name} ({got['class']}): {key} relative max error {error:.2e}")
        for cache in ("cached", "uncached"):
            check(got[cache] == expected["greedy"], f"{name}: greedy {GREEDY_TOKENS} tokens, {cache} "
                                                    f"{'==' if got[cache] == expected['greedy'] else '!='} ours")
        for kind, tokenizer in got["tokenizers"].items():
            if "error" in tokenizer:
                check(False, f"{name}: {kind}: {tokenizer['error']}")
                continue
            for key in ("ids", "ids_bos", "chat_prompt_ids"):
                wrong = [i for i, (a, b) in enumerate(zip(tokenizer[key], reference[key])) if a != b]
                check(not wrong, f"{name}: {kind} ({tokenizer['class']}) {key}: "
                                 f"{len(reference[key]) - len(wrong)}/{len(reference[key])} identical"
                                 + (f", first differing: {reference.get('texts', [])[wrong[0]]!r}"
                                    if wrong and key != "chat_prompt_ids" else ""))
            # Decoding is reported, not checked: transformers keeps the space of the dummy prefix after a chat
            # marker, and the SentencePiece LlamaTokenizer (legacy) also drops leading spaces and adds spaces
            # around markers. The ids above are what a model sees.
            differ = [i for i, (a, b) in enumerate(zip(tokenizer["decoded"], reference["decoded"])) if a != b]
            count = len(reference["texts"])
            lines.append(f"{'note' if differ else 'ok':6}{name}: {kind} decodes {count - len(differ)}/{count} of "
                         f"our id lists to our text"
                         + (f", e.g. {tokenizer['decoded'][differ[0]]!r} for {reference['decoded'][differ[0]]!r}"
                            if differ else ""))
    if errors:
        lines.append(f"largest logits relative max error: {max(errors):.2e} (tolerance {TOLERANCE:g})")
    return lines, failures


def run_check(python: str, out: Path) -> tuple[list[str], list[str]]:
    build(out)
    done = subprocess.run([python, str(Path(__file__).resolve()), "--client", str(out)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)  # no prompt (trust_remote_code) can wait
    if done.returncode != 0:
        return [done.stdout, done.stderr], [f"the client ({python}) exited {done.returncode}"]
    return compare(out)


# ------------------------------------------------------------------------ the client (torch + transformers)

def client(out: Path) -> None:
    """Loads every export with the transformers of this Python, and writes DIR/client.json and client.npz."""
    import numpy as np
    import tokenizers
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = json.loads((out / "reference.json").read_text())
    ours = np.load(out / "reference.npz")
    versions = {"python": sys.version.split()[0], "transformers": transformers.__version__,
                "torch": torch.__version__, "tokenizers": tokenizers.__version__}
    try:
        import sentencepiece
        versions["sentencepiece"] = sentencepiece.__version__
    except ImportError:
        pass
    result, arrays = {"versions": versions, "exports": {}}, {}
    for name, expected in reference["exports"].items():
        folder, case = out / "exports" / name, expected["case"]
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=expected["arch"] == "minicpm",
                                                         torch_dtype=torch.float32).eval()
        except Exception as err:  # reported, not raised: the other exports are still checked
            result["exports"][name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        got = {"class": f"{type(model).__module__}.{type(model).__name__}", "tokenizers": {}}
        with torch.no_grad():
            tokens = torch.from_numpy(ours[f"{case}/tokens"].astype(np.int64))
            arrays[f"{name}/logits"] = model(tokens).logits.float().numpy()
            prompt = torch.tensor([expected["prompt"]])
            for cache in (True, False):
                ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=reference["greedy_tokens"], use_cache=cache, pad_token_id=0)
                got["cached" if cache else "uncached"] = ids[0].tolist()
            # Logits on our ids of a chat text (the tokenizers are compared on their own).
            arrays[f"{name}/text_logits"] = model(torch.tensor([expected["text_ids"]])).logits.float().numpy()
        for kind in TOKENIZERS:
            try:
                if kind.startswith("AutoTokenizer"):
                    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=kind == "AutoTokenizer")
                else:
                    tokenizer = getattr(transformers, kind).from_pretrained(folder)
                entry = {"class": type(tokenizer).__name__,
                         "ids": [tokenizer.encode(t, add_special_tokens=False) for t in reference["texts"]],
                         "ids_bos": [tokenizer(t)["input_ids"] for t in reference["texts"]],
                         "chat_prompt_ids": [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False,
                                                                                add_generation_prompt=True))
                                             for c in reference["conversations"]],
                         "decoded": [tokenizer.decode(ids) for ids in reference["ids"]]}
            except Exception as err:
                entry = {"error": f"{type(err).__name__}: {err}"}
            got["tokenizers"][kind] = entry
        result["exports"][name] = got
    (out / "client.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))
    np.savez(out / "client.npz", **arrays)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", help="the other environment's python, e.g. /tmp/tf448/bin/python")
    parser.add_argument("--out", help="where to write the exports and results (default: a temporary folder)")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # run by --python: load DIR's exports
    args = parser.parse_args(argv)
    if args.client:
        client(Path(args.client))
        return 0
    if not args.python:
        parser.error("--python is required")
    with tempfile.TemporaryDirectory() as tmp:
        lines, failures = run_check(args.python, Path(args.out or tmp))
    print("\n".join(lines))
    print(f"{len(failures)} failed" if failures else "all identical: logits within "
          f"{TOLERANCE:g}, greedy continuations, token ids and chat-prompt ids")
    return 1 if failures else 0


if __name__ == "__main__":
    # As the client, this file runs as a script: its folder (minicpm_jax/hf, with config.py, tokenizer.py, ...)
    # must not shadow the client's modules.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    sys.exit(main(sys.argv[1:]))
