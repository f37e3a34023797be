"""Text → fixed-length int32 token ids: a word-level WordPiece tokenizer (Hugging Face
`tokenizers`).

    tokenizer = train_tokenizer(train_sentences, vocab_size=8192)   # the train split only
    ids = encode(tokenizer, ["a gripping , funny film", ""], seq_len=64)  # int32 [2, 64]
    save(tokenizer, "models/unpruned/tokenizer.json"); tokenizer = load(...)

Every sequence is `[CLS]` followed by the sentence's word pieces, truncated to `seq_len` ids
(words past it are dropped) and padded with `PAD_ID` (0) up to it, so an empty string is
`[CLS]` alone and a model never sees a sequence without a token. Text is lower-cased and
accents are stripped (BERT's uncased normaliser), punctuation is split off, and a word not in
the vocabulary becomes `[UNK]`. Training is deterministic: the same
sentences give the same vocabulary and ids.

`tokenizers` is imported on first use only (`pip install 'jaxprune[text]'`), so image runs
never need it.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np

from jaxprune import files

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
SPECIAL_TOKENS = (PAD, UNK, CLS)  # ids 0, 1, 2 in every trained vocabulary
PAD_ID = 0  # models mask positions holding PAD_ID (attention and pooling)


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("Text data and text models need Hugging Face tokenizers: "
                          "`pip install 'jaxprune[text]'` (or `pip install tokenizers`).") from e
    return tokenizers


def _check_texts(texts, what: str = "texts") -> list:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence) and \
            not isinstance(texts, np.ndarray):
        raise TypeError(f"{what}: expected a list of strings, got {type(texts).__name__}; "
                        "wrap one sentence as [sentence].")
    texts = list(texts)
    bad = [(i, type(t).__name__) for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        i, kind = bad[0]
        raise TypeError(f"{what}: item {i} is a {kind}, not a str ({len(bad)} of {len(texts)} "
                        "items are not strings); pass raw text, e.g. decode bytes with "
                        ".decode('utf-8') first.")
    return texts


def _split_words(tokenizer):
    """BERT's uncased normaliser and word splitting (set before training, kept in the file)."""
    tk = _tokenizers()
    tokenizer.normalizer = tk.normalizers.BertNormalizer(lowercase=True, strip_accents=True,
                                                         clean_text=True)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _add_cls(tokenizer):
    tk = _tokenizers()
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single=f"{CLS} $A", special_tokens=[(CLS, tokenizer.token_to_id(CLS))])
    tokenizer.decoder = tk.decoders.WordPiece()
    return tokenizer


def train_tokenizer(sentences, vocab_size: int = 8192, min_frequency: int = 2):
    """A word-level WordPiece tokenizer made from `sentences` (a list of str; give the train
    split only).

    The vocabulary is the special tokens and the most frequent words seen at least
    `min_frequency` times, up to `vocab_size` entries (an upper bound); any other word is
    `[UNK]`.
    Words are counted here, ties broken alphabetically, so the same sentences always give the
    same ids (the library's WordPiece trainer orders its alphabet by a randomly seeded hash).
    """
    sentences = _check_texts(sentences, "train_tokenizer sentences")
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size!r}: use an int > {len(SPECIAL_TOKENS)} "
                         "(the special tokens take the first ids).")
    tk = _tokenizers()
    splitter = _split_words(tk.Tokenizer(tk.models.WordPiece({UNK: 0}, unk_token=UNK)))
    counts = collections.Counter()
    for sentence in sentences:
        words = splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(sentence))
        counts.update(w for w, _ in words)
    words = sorted((w for w, n in counts.items() if n >= min_frequency and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    pieces = list(SPECIAL_TOKENS) + words[:int(vocab_size) - len(SPECIAL_TOKENS)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = _split_words(tk.Tokenizer(tk.models.WordPiece(vocab, unk_token=UNK)))
    return _add_cls(tokenizer)


def encode(tokenizer, texts, seq_len: int) -> np.ndarray:
    """int32 [len(texts), seq_len] token ids: `[CLS]` + word pieces, truncated to `seq_len`,
    padded with `PAD_ID`. Raises TypeError naming the first item that is not a str."""
    texts = _check_texts(texts)
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: use an int >= 1.")
    out = np.full((len(texts), int(seq_len)), PAD_ID, np.int32)
    for start in range(0, len(texts), 8192):  # bounded memory on big splits
        for i, enc in enumerate(tokenizer.encode_batch(texts[start:start + 8192])):
            ids = enc.ids[:seq_len]
            out[start + i, :len(ids)] = ids
    return out


def vocab_size(tokenizer) -> int:
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def to_json(tokenizer) -> str:
    return tokenizer.to_str()


def from_json(text: str):
    return _tokenizers().Tokenizer.from_str(text)


def save(tokenizer, path: str) -> None:
    """Writes the tokenizer (its whole definition, vocabulary included) as JSON, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_text(path, to_json(tokenizer))


def load(path: str):
    """The tokenizer `save` wrote. Raises FileNotFoundError / ValueError naming the file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
        return from_json(text)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception
        raise ValueError(f"{path}: not a tokenizer file ({e}); it is written beside a saved "
                         "model by the pipeline, rerun it to rewrite the file.") from e
