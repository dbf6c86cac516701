"""Small corpora and prepared folders for the data-layer tests (all generated in tmp dirs)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from minicpm_jax.data import records, tokenizer

# Token ids of synthetic documents encode where they come from: source * SOURCE + doc * DOC + position.
# Any token therefore names its source, its document and its position, so tests can check that
# packed rows never mix documents and that every document is seen.
DOC = 1000
SOURCE = 1_000_000

# Mixed scripts and emoji, so the tokenizer trained on them needs byte fallback too.
_SENTENCE = "the quick brown fox jumps over a lazy dog 模型 在 学习 数据 and 你好 世界 tokens pack rows 😀 🎉 of length"
_WORDS = _SENTENCE.split()


def sample_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def train_small_tokenizer(out_dir: Path) -> Path:
    return tokenizer.train_tokenizer(sample_texts(300), 400, out_dir / "tok")


def train_variant_tokenizer(out_dir: Path, name: str, **settings) -> Path:
    """A small SentencePiece model with `train_tokenizer`'s settings but `settings` changed (add_dummy_prefix=False
    for the models trained here before the dummy prefix, another normalizer or model type, no byte fallback)."""
    import sentencepiece as spm

    options = dict(
        vocab_size=400, model_type="bpe", character_coverage=1.0, byte_fallback=True, unk_id=tokenizer.UNK_ID,
        bos_id=tokenizer.BOS_ID, eos_id=tokenizer.EOS_ID, pad_id=-1,
        user_defined_symbols=[tokenizer.CHAT_USER, tokenizer.CHAT_AI], normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    options.update(settings)
    prefix = out_dir / name
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts(300)), model_prefix=str(prefix), **options)
    return prefix.with_name(name + ".model")


def synthetic_docs(source: int, num_docs: int, min_len: int, max_len: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + source)
    lengths = rng.integers(min_len, max_len + 1, size=num_docs)
    return [source * SOURCE + d * DOC + np.arange(n, dtype=np.int32) for d, n in enumerate(lengths)]


def write_prepared(out_dir: Path, docs: list[np.ndarray], num_shards: int = 2, sha256: str = "synthetic") -> Path:
    """A prepared folder holding `docs` as-is (no tokenizer), with the manifest fields readers use."""
    writer = records.ShardWriter(out_dir, num_shards)
    for doc in docs:
        writer.write(doc)
    num_tokens = sum(len(d) for d in docs)
    records.write_manifest(
        out_dir,
        {
            "num_documents": len(docs),
            "num_tokens": num_tokens,
            "mean_document_tokens": num_tokens / len(docs),
            "shards": writer.close(),
            "tokenizer": {"path": "synthetic", "sha256": sha256},
        },
    )
    return out_dir


def doc_ids(tokens: np.ndarray, mask: np.ndarray) -> set[int]:
    """(source, doc) keys of the tokens where mask is set."""
    return set((tokens[mask > 0] // DOC).tolist())
