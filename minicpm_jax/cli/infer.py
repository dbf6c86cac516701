"""Subcommands that run a trained model: generate, chat, eval, lm-eval.

Each takes `--model` (a run directory, optionally with `--step`, or a Hugging Face folder) and finds the
tokenizer there unless `--tokenizer` names one.
"""

from __future__ import annotations

import argparse
import logging
import sys

from minicpm_jax.files import write_json

log = logging.getLogger("minicpm_jax")


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="continue prompts with the model (streams a single prompt)")
    _add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_sampling_arguments(p)
    p.set_defaults(func=generate)

    p = subparsers.add_parser("chat", help="chat with the model in the terminal (chat template, history kept)")
    _add_model_arguments(p)
    p.add_argument("--system", help="system prompt placed before the first turn")
    _add_sampling_arguments(p)
    p.set_defaults(func=chat)

    p = subparsers.add_parser("eval", help="held-out loss and bits per byte; multiple-choice accuracy")
    _add_model_arguments(p)
    p.add_argument("--data", nargs="+", default=[], help="prepared folders (e.g. DATA/val) to score per token/byte")
    p.add_argument("--mc", nargs="+", default=[], help="multiple-choice JSONL files (context, choices, label)")
    p.add_argument("--seq-len", type=int, default=512, help="row length for the held-out sets")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="stop each held-out set after this many batches")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest scored multiple-choice sequence (default: max_position_embeddings)")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=evaluate)

    p = subparsers.add_parser("lm-eval", help="run lm-evaluation-harness tasks (needs the [eval] extra)")
    _add_model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write lm_eval's results as JSON here")
    p.set_defaults(func=lm_eval)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run directory or Hugging Face folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: latest)")
    p.add_argument("--tokenizer", help="SentencePiece .model (default: the run's data.tokenizer or "
                                       "the HF folder's tokenizer.model)")


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)


def _sampling(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed}


def _load(args: argparse.Namespace, need_tokenizer: bool = True):
    from minicpm_jax.infer.inference import load_for_inference, require_tokenizer

    model, tokenizer = load_for_inference(args.model, args.step, args.tokenizer)
    return model, require_tokenizer(tokenizer, args.model) if need_tokenizer else tokenizer


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(args: argparse.Namespace) -> None:
    from minicpm_jax.infer.generate import generate as generate_texts

    model, tokenizer = _load(args)
    if len(args.prompt) == 1:
        _write(args.prompt[0])
        generate_texts(model, tokenizer, args.prompt, stop=args.stop, stream=_write, **_sampling(args))
        _write("\n")
        return
    for prompt, text in zip(args.prompt, generate_texts(model, tokenizer, args.prompt, stop=args.stop,
                                                        **_sampling(args))):
        print(f"--- {prompt}\n{prompt}{text}")


def chat(args: argparse.Namespace) -> None:
    from minicpm_jax.infer.generate import ChatSession

    model, tokenizer = _load(args)
    session = ChatSession(model, tokenizer, system=args.system, **_sampling(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /reset clears the history, /exit (or Ctrl-D, Ctrl-C) quits")
    try:
        _chat_loop(session, interactive)
    except KeyboardInterrupt:  # Ctrl-C quits, at the prompt or mid-answer
        _write("\n")


def _chat_loop(session, interactive: bool) -> None:
    while True:
        if interactive:
            _write("\n>>> ")
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        try:
            session.send(line.rstrip("\n"), stream=_write)
        except ValueError as err:  # a history that fills the model's context
            print(f"\n[{err}; /reset starts a new conversation]")
            continue
        _write("\n")


def evaluate(args: argparse.Namespace) -> None:
    from minicpm_jax.eval import evaluate as evaluate_lib

    if not args.data and not args.mc:
        raise ValueError("give --data (prepared held-out folders) and/or --mc (multiple-choice JSONL files)")
    from minicpm_jax.data import records

    # Every input is checked before the model loads: a typo costs no loading time.
    examples = {path: evaluate_lib.read_multiple_choice(path) for path in args.mc}
    for path in args.data:
        records.read_manifest(path)
    model, tokenizer = _load(args, need_tokenizer=bool(args.mc))
    results = {}
    if args.data:
        results["held_out"] = evaluate_lib.evaluate_model_on_sets(model, args.data, args.seq_len, args.batch_size,
                                                                  max_batches=args.max_batches, tokenizer=tokenizer)
    if examples:
        scorer = evaluate_lib.LoglikelihoodScorer(model, batch_size=args.batch_size, max_length=args.max_length)
        results["multiple_choice"] = {path: evaluate_lib.score_multiple_choice(scorer, tokenizer, items)
                                      for path, items in examples.items()}
    print(evaluate_lib.format_table(results))
    if args.out:
        write_json(args.out, {"model": args.model, "step": args.step, **results})
        log.info("wrote %s", args.out)


def lm_eval(args: argparse.Namespace) -> None:
    try:
        import lm_eval as harness
        from lm_eval.utils import make_table
    except ImportError as err:
        raise ImportError("lm-eval needs lm-evaluation-harness: pip install 'minicpm-jax[eval]'") from err
    from minicpm_jax.eval.lm_eval_adapter import MiniCPMJaxLM

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    task_manager = _checked_tasks(tasks)  # before the model loads
    lm = MiniCPMJaxLM(args.model, step=args.step, tokenizer=args.tokenizer, batch_size=args.batch_size)
    results = harness.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=task_manager)
    print(make_table(results))
    if args.out:
        write_json(args.out, results["results"], default=str)
        log.info("wrote %s", args.out)


def _checked_tasks(tasks: list[str]):
    """lm_eval's TaskManager, after checking that it knows every task (names, groups, YAML files, globs)."""
    import difflib
    import os

    from lm_eval.tasks import TaskManager

    from minicpm_jax.config import ConfigError

    if not tasks:
        raise ConfigError("--tasks names no task")
    manager = TaskManager()
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not os.path.isfile(t) and not any(c in t for c in "*?[")]
    if unknown:
        hints = []
        for task in unknown:
            close = difflib.get_close_matches(task, known, n=3)
            hints.append(f"{task!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"--tasks: unknown lm_eval task(s) {', '.join(hints)}; `lm_eval --tasks list` lists them")
    return manager
