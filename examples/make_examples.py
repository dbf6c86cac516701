"""Writes the small example files for `minicpm-jax sft` and `minicpm-jax dpo` from templates.

    python examples/make_examples.py            # -> examples/sft_example.jsonl, examples/dpo_example.jsonl

Every conversation is generated here from a few templates (arithmetic, word tasks, questions about the
demo corpus's books), nothing is taken from a dataset. Preference pairs put a correct answer against a
wrong or unhelpful one. The files are deterministic (seeded), just big enough to show the pipelines work.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAYS = ["Hamlet", "Macbeth", "King Lear", "Othello", "The Tempest", "Twelfth Night", "Romeo and Juliet"]
BOOKS = ["Genesis", "Exodus", "Psalms", "Proverbs", "Job", "Ruth", "Isaiah"]
WORDS = ["crown", "storm", "river", "lamp", "garden", "shepherd", "sword", "harvest", "island", "letter"]
SYSTEM = "You are a helpful assistant who answers briefly."


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    wrong = a + b + rng.choice([-3, -1, 1, 2, 10])
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."


def _author(rng: random.Random) -> tuple[str, str, str]:
    play = rng.choice(PLAYS)
    return (f"Who wrote the play {play}?", f"{play} was written by William Shakespeare.",
            f"{play} was written by {rng.choice(['Moses', 'King David', 'Solomon'])}.")


def _book(rng: random.Random) -> tuple[str, str, str]:
    book = rng.choice(BOOKS)
    return (f"Is {book} a play by Shakespeare or a book of the Bible?", f"{book} is a book of the Bible.",
            f"{book} is a play by Shakespeare.")


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, 3)
    return (f"Say these words in reverse order: {', '.join(words)}.", ", ".join(reversed(words)) + ".",
            ", ".join(words) + ".")


def _upper(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f"Write the word {word} in capital letters.", word.upper(), "I would rather not."


TEMPLATES = (_arithmetic, _author, _book, _reverse, _upper)


def sft_conversations(rng: random.Random, count: int) -> list[dict]:
    conversations = []
    for i in range(count):
        turns = 1 + (i % 3 == 0)  # every third conversation has two exchanges
        messages = [{"role": "system", "content": SYSTEM}] if i % 4 == 1 else []
        for _ in range(turns):
            question, answer, _ = rng.choice(TEMPLATES)(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append({"messages": messages})
    return conversations


def preference_pairs(rng: random.Random, count: int) -> list[dict]:
    pairs = []
    for i in range(count):
        question, good, bad = rng.choice(TEMPLATES)(rng)
        if i % 5 == 4:  # the message-list form, with an earlier exchange in the prompt
            earlier_q, earlier_a, _ = rng.choice(TEMPLATES)(rng)
            prompt = [{"role": "user", "content": earlier_q}, {"role": "assistant", "content": earlier_a},
                      {"role": "user", "content": question}]
            pairs.append({"prompt": prompt,
                          "chosen": [{"role": "assistant", "content": good}],
                          "rejected": [{"role": "assistant", "content": bad}]})
        else:
            pairs.append({"prompt": question, "chosen": good, "rejected": bad})
    return pairs


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    _write(HERE / "sft_example.jsonl", sft_conversations(random.Random(0), 96))
    _write(HERE / "dpo_example.jsonl", preference_pairs(random.Random(1), 64))


if __name__ == "__main__":
    main()
