"""Train a byte-fallback BPE sentencepiece model from any iterator of documents."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from tokenizer.core import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

log = logging.getLogger(__name__)

# sentencepiece skips training sentences longer than its limit; long lines are cut to this.
MAX_LINE_CHARS = 4096


def training_lines(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """Lines of the first documents, up to `max_chars` characters in all.

    Newline is a user-defined symbol (always its own token), so no piece can span a line break
    and training on lines loses nothing."""
    budget = max_chars
    for doc in documents:
        for line in doc.split("\n"):
            while line and budget > 0:
                chunk, line = line[:MAX_LINE_CHARS], line[MAX_LINE_CHARS:]
                chunk = chunk[:budget]
                budget -= len(chunk)
                yield chunk
        if budget <= 0:
            return


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    output_path: str | Path,
    max_chars: int = 200_000_000,
    num_threads: int | None = None,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    """Train a BPE tokenizer and write it to `output_path` (atomically).

    Byte fallback makes every string encodable (CJK, emoji, binary junk); digits are split one
    per token; text is not normalised and whitespace is kept, so decode(encode(text)) == text
    for every text without U+2581 (LOWER ONE EIGHTH BLOCK): sentencepiece marks spaces with that
    character inside its pieces, so a U+2581 in the text encodes, and decodes, as a space.
    Special ids: unk=0, bos=1, eos=2, pad=3."""
    output_path = Path(output_path)
    model = io.BytesIO()
    chars = 0

    def counted(lines: Iterator[str]) -> Iterator[str]:
        nonlocal chars
        for line in lines:
            chars += len(line)
            yield line

    log.info("training a %d-piece BPE tokenizer on up to %.3g characters", vocab_size, max_chars)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(training_lines(documents, max_chars)),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            max_sentence_length=4 * MAX_LINE_CHARS,  # bytes, and a character is up to 4 of them
            character_coverage=character_coverage,
            hard_vocab_limit=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(f"sentencepiece could not train a {vocab_size}-piece tokenizer on {chars} "
                         f"characters: {exc}. Give more text or a smaller vocabulary.") from exc
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, output_path)
    log.info("tokenizer trained on %d characters, written to %s", chars, output_path)
    return Tokenizer.load(output_path)
