"""Tokenizer (jaxprune/text.py): training, encoding, saving; tiny synthetic sentences."""
import numpy as np
import pytest

from jaxprune import text

SENTENCES = ["a gripping , funny film ", "a dull , boring film ", "funny and warm ",
             "boring boring boring ", "the film is a mess ", "warm and gripping "]


@pytest.fixture(scope="module")
def tokenizer():
    return text.train_tokenizer(SENTENCES, vocab_size=64)


def test_special_tokens_and_vocabulary(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in text.SPECIAL_TOKENS] == [0, 1, 2]
    assert text.PAD_ID == vocab[text.PAD]
    # words seen at least twice are in, words seen once ("mess") are not
    assert "boring" in vocab and "film" in vocab and "mess" not in vocab
    assert text.vocab_size(tokenizer) == len(vocab) <= 64


def test_vocab_size_is_an_upper_bound_by_frequency():
    small = text.train_tokenizer(SENTENCES, vocab_size=5)
    vocab = small.get_vocab()
    assert len(vocab) == 5
    # the two most frequent words: "boring" (4) and then "film" (3, ties broken alphabetically
    # against "a" (3): "a" < "film")
    assert set(vocab) == set(text.SPECIAL_TOKENS) | {"boring", "a"}


def test_training_is_deterministic():
    a = text.to_json(text.train_tokenizer(SENTENCES, vocab_size=64))
    b = text.to_json(text.train_tokenizer(list(SENTENCES), vocab_size=64))
    assert a == b


def test_encode_pads_truncates_and_handles_empty_and_unknown(tokenizer):
    ids = text.encode(tokenizer, ["funny film", "", "zzyzx qwerty film", "A FUNNY Film!"], 4)
    vocab = tokenizer.get_vocab()
    cls, unk, pad = vocab[text.CLS], vocab[text.UNK], text.PAD_ID
    assert ids.dtype == np.int32 and ids.shape == (4, 4)
    np.testing.assert_array_equal(ids[0], [cls, vocab["funny"], vocab["film"], pad])
    np.testing.assert_array_equal(ids[1], [cls, pad, pad, pad])  # empty: [CLS] alone
    np.testing.assert_array_equal(ids[2], [cls, unk, unk, vocab["film"]])
    # lower-cased, punctuation split off; "!" is unknown and the 5th id is cut (truncation)
    np.testing.assert_array_equal(ids[3], [cls, vocab["a"], vocab["funny"], vocab["film"]])
    long = text.encode(tokenizer, ["film " * 50], 8)
    assert long.shape == (1, 8) and (long != pad).all()  # truncated to the length
    assert text.encode(tokenizer, [], 8).shape == (0, 8)


def test_save_load_round_trip(tokenizer, tmp_path):
    path = str(tmp_path / "sub" / "tokenizer.json")
    text.save(tokenizer, path)
    again = text.load(path)
    batch = ["a gripping , funny film", "", "unknown words here"]
    np.testing.assert_array_equal(text.encode(again, batch, 12), text.encode(tokenizer, batch, 12))
    assert text.to_json(again) == text.to_json(tokenizer)


def test_damaged_tokenizer_file_is_named(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="not a tokenizer file"):
        text.load(str(path))


@pytest.mark.parametrize("bad, match", [
    ("one sentence", "list of strings"),
    (b"bytes", "list of strings"),
    (["ok", 3], "item 1 is a int"),
    ([b"bytes"], "item 0 is a bytes"),
    (None, "list of strings"),
    (np.zeros((2, 4)), "item 0 is a ndarray|item 0 is a float"),
])
def test_non_string_input_is_refused(tokenizer, bad, match):
    with pytest.raises(TypeError, match=match):
        text.encode(tokenizer, bad, 8)


def test_bad_sizes_are_refused(tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        text.encode(tokenizer, ["film"], 0)
    with pytest.raises(ValueError, match="vocab_size"):
        text.train_tokenizer(SENTENCES, vocab_size=2)
