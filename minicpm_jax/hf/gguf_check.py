"""Checks that llama.cpp would tokenize a GGUF made from our export (by llama.cpp's `convert_hf_to_gguf.py`) exactly
as `Tokenizer.encode` does, from the GGUF's tokenizer metadata alone.

    python -m minicpm_jax.hf.gguf_check EXPORT_DIR MODEL.gguf ["text" ...]

It reads the GGUF with the `gguf` package (on PyPI; also in llama.cpp's gguf-py), checks the pieces, scores and
token types against tokenizer.model (chat markers USER_DEFINED, `<s>`/`</s>` CONTROL, `<unk>` UNKNOWN, bytes
BYTE), BOS handling and the "▁" prefix flag, and then tokenizes the texts with llama.cpp's SPM algorithm as
llama-vocab.cpp implements it (split out USER_DEFINED tokens, and CONTROL ones as llama.cpp does when asked to
parse special tokens; a " " before each stretch of text when add_space_prefix; spaces to "▁"; merge the adjacent
pair whose union scores highest; bytes for what no piece covers). This is a model of llama.cpp's tokenizer, not
llama.cpp itself: the README (Hugging Face conversion) gives the check with llama.cpp's own `llama-tokenize`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from minicpm_jax.data.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
DEFAULT_TEXTS = ("Hello world", " Hello", "  two", "a\nb", "你好 世界", "😀 Ωß€", "<用户>Hi<AI>",
                 "<用户> 你好, who?\n<AI> I am", "x<AI><AI>  y<用户>\n")


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    values = [field.parts[i] for i in field.data]
    if field.types and field.types[0].name == "ARRAY":
        return [bytes(v).decode("utf-8") if field.types[-1].name == "STRING" else v.tolist()[0] for v in values]
    value = values[0]
    return bytes(value).decode("utf-8") if field.types[0].name == "STRING" else value.tolist()[0]


def read_vocab(path: str | Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {"model": _field(reader, "tokenizer.ggml.model"), "tokens": _field(reader, "tokenizer.ggml.tokens"),
            "scores": _field(reader, "tokenizer.ggml.scores"), "types": _field(reader, "tokenizer.ggml.token_type"),
            "add_space_prefix": bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
            "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
            "bos": _field(reader, "tokenizer.ggml.bos_token_id"), "eos": _field(reader, "tokenizer.ggml.eos_token_id")}


def llama_cpp_spm_tokenize(vocab: dict, text: str, parse_special: bool = True) -> list[int]:
    """llama.cpp's SPM tokenization of `text` (no BOS), from the GGUF vocab."""
    types, tokens, scores = vocab["types"], vocab["tokens"], vocab["scores"]
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED, UNKNOWN, CONTROL)}
    splitting = {t: i for i, t in enumerate(tokens)
                 if types[i] == USER_DEFINED or (parse_special and types[i] in (CONTROL, UNKNOWN))}
    fragments: list[str | int] = [text] if text else []
    for token, token_id in splitting.items():
        out: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                out.append(fragment)
                continue
            parts = fragment.split(token)
            for j, part in enumerate(parts):
                if j:
                    out.append(token_id)
                if part:
                    out.append(part)
        fragments = out
    byte_ids = {t: i for i, t in enumerate(tokens) if types[i] == BYTE}
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    result, previous_special = [], True
    for fragment in fragments:
        if isinstance(fragment, int):
            result.append(fragment)
            previous_special = True
            continue
        piece_text = (" " if vocab["add_space_prefix"] and previous_special else "") + fragment
        symbols = list(piece_text.replace(" ", "\u2581"))
        while True:
            best = None
            for k in range(len(symbols) - 1):
                merged = symbols[k] + symbols[k + 1]
                if merged in mergeable and (best is None or scores[mergeable[merged]] > best[0]):
                    best = (scores[mergeable[merged]], k)
            if best is None:
                break
            k = best[1]
            symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
        for symbol in symbols:
            if symbol in ids:
                result.append(ids[symbol])
            else:
                result.extend(byte_ids[f"<0x{b:02X}>"] for b in symbol.encode("utf-8"))
        previous_special = False
    return result


def check(export_dir: str | Path, gguf_path: str | Path, texts=DEFAULT_TEXTS) -> list[str]:
    """What differs between the GGUF's tokenizer and ours (an empty list when nothing does)."""
    tokenizer = Tokenizer(Path(export_dir) / "tokenizer.model")
    vocab = read_vocab(gguf_path)
    problems = []
    if vocab["model"] != "llama":
        problems.append(f"tokenizer.ggml.model is {vocab['model']!r}, not 'llama' (SentencePiece)")
    expected_types = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(i)
        if i == tokenizer.unk_id:  # the converter makes it CONTROL (added_tokens_decoder says special)
            expected = vocab["types"][i] if vocab["types"][i] in (UNKNOWN, CONTROL) else UNKNOWN
        elif i in (tokenizer.bos_id, tokenizer.eos_id):
            expected = CONTROL
        elif i in tokenizer.chat_markers.values():
            expected = USER_DEFINED
        elif piece.startswith("<0x") and len(piece) == 6:
            expected = BYTE
        else:
            expected = NORMAL
        expected_types.append(expected)
        if vocab["tokens"][i] != piece:
            problems.append(f"token {i}: {vocab['tokens'][i]!r} != {piece!r}")
    wrong_types = [(i, vocab["types"][i], t) for i, t in enumerate(expected_types) if vocab["types"][i] != t]
    if wrong_types:
        problems.append(f"token types (id, gguf, expected): {wrong_types[:8]}")
    if vocab["add_space_prefix"] != tokenizer.dummy_prefix:
        problems.append(f"add_space_prefix={vocab['add_space_prefix']} but the tokenizer's dummy prefix is "
                        f"{tokenizer.dummy_prefix}")
    if (vocab["add_bos"], vocab["bos"], vocab["eos"]) != (True, tokenizer.bos_id, tokenizer.eos_id):
        problems.append(f"add_bos/bos/eos = {vocab['add_bos']}/{vocab['bos']}/{vocab['eos']}")
    for text in texts:
        theirs, ours = llama_cpp_spm_tokenize(vocab, text), tokenizer.encode(text)
        if theirs != ours:
            problems.append(f"{text!r}: llama.cpp {theirs} != ours {ours}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    problems = check(argv[0], argv[1], argv[2:] or DEFAULT_TEXTS)
    print("\n".join(problems) or "GGUF tokenizer metadata implies our tokenization")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
