"""Tokenizer training, exact round trips (CJK included; U+2581 is the one exception), batch
encode, save/load."""

from __future__ import annotations

import pytest

from tests.conftest import TEST_VOCAB, pydoc_documents
from tokenizer import Tokenizer, train_tokenizer
from tokenizer.train import MAX_LINE_CHARS, training_lines

SAMPLES = [
    "def f(x):\n    return  x + 1\n\n\tdone",
    " leading and trailing spaces  ",
    "日本語の文章です。東京は日本の首都です。",
    "中文文本测试：我们训练自己的模型。",
    "한국어 🙂 emoji ∑ and a control \x07 character",
    "numbers 1234567890 and 3.14159",
    "",
    "\n\n\n",
]


def test_special_ids_and_size(tokenizer):
    assert tokenizer.vocab_size == TEST_VOCAB
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_whitespace_mark_u2581_comes_back_as_a_space(tokenizer):
    """sentencepiece writes spaces as U+2581 inside its pieces, so a U+2581 in the text encodes as a
    space: the one character whose round trip is not exact (tokenizer/train.py says so)."""
    assert tokenizer.encode("a\u2581b") == tokenizer.encode("a b")
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"


def test_cjk_is_learned_when_in_the_training_text(tmp_path):
    japanese = "日本語の文章です。東京は日本の首都です。日本語を話します。" * 50
    chinese = "我们训练自己的模型。中文文本测试。我们的数据。" * 50
    tok = train_tokenizer(pydoc_documents(20) + [japanese, chinese], 600, tmp_path / "cjk.model")
    for text in ("日本語の文章です。", "我们训练自己的模型。"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        byte_pieces = sum(tok.id_to_piece(i).startswith("<0x") for i in ids)
        assert byte_pieces == 0, [tok.id_to_piece(i) for i in ids]
        assert len(ids) < len(text)  # merges, not one token per character


def test_digits_are_split(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("year 2024")]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_batch_encode_matches_single(tokenizer):
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(t) for t in SAMPLES]
    assert tokenizer.decode_batch(tokenizer.encode_batch(SAMPLES)) == SAMPLES


def test_save_load_is_identical(tokenizer, tokenizer_file):
    again = Tokenizer.load(tokenizer_file)
    assert again.encode_batch(SAMPLES) == tokenizer.encode_batch(SAMPLES)
    assert not list(tokenizer_file.parent.glob("*.tmp"))
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tokenizer_file.parent / "missing.model")


def test_training_text_is_bounded():
    documents = ["a" * 10_000, "b\nc\n" * 1000, "d" * 10]
    lines = list(training_lines(iter(documents), max_chars=11_000))
    assert sum(map(len, lines)) == 11_000
    assert max(map(len, lines)) == MAX_LINE_CHARS

    def endless():
        while True:
            yield "word " * 100

    assert sum(map(len, training_lines(endless(), max_chars=5000))) == 5000


def test_too_little_text_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Give more text or a smaller vocabulary"):
        train_tokenizer(["tiny text"], 5000, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def reference_documents(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """What encode_documents must equal: each text encoded whole by sentencepiece, then EOS."""
    return [t for text in texts for t in (*tokenizer.encode(text), tokenizer.eos_id)]


def random_texts(seed: int, count: int) -> list[str]:
    """Strings that stress the word split: runs of spaces, tabs, newlines, digits, CJK, emoji,
    combining marks, control characters and the ▁ meta symbol itself."""
    import random

    rng = random.Random(seed)
    alphabet = ["a", "Z", "é", "e\u0301", "日", "本", "🙂", "∑", "7", "0", " ", " ", " ", "  ", "\t", "\n", "\r\n",
                "\u2581", "\x00", "\x07", "\u00a0", "\u3000", "def", "the", " the", "ing", ".", "::", "\u200b"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(count)]


@pytest.mark.parametrize("seed", range(3))
def test_encode_documents_equals_encoding_each_text_whole(tokenizer, seed):
    texts = random_texts(seed, 400)
    assert tokenizer.encode_documents(texts).tolist() == reference_documents(tokenizer, texts)
    # and again, now from the word cache
    assert tokenizer.encode_documents(texts[::-1]).tolist() == reference_documents(tokenizer, texts[::-1])


def test_encode_documents_on_real_text(tokenizer):
    from pretrain.data.builtin import python_docs_documents

    docs = list(python_docs_documents())[:300] + SAMPLES
    assert tokenizer.encode_documents(docs).tolist() == reference_documents(tokenizer, docs)
    assert tokenizer.encode_documents([]).tolist() == []


def test_token_byte_lengths_add_up_to_the_texts_utf8_length(tokenizer):
    lengths = tokenizer.token_byte_lengths()
    assert lengths[tokenizer.eos_id] == 0 and lengths[tokenizer.unk_id] == 0
    for text in pydoc_documents(20) + ["naïve café — 東京 ü"]:
        counted = int(lengths[tokenizer.encode(text)].sum())
        assert counted - len(text.encode()) in (0, 1), text[:40]  # at most the word-start space added in front
