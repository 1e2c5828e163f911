"""The run's sentencepiece tokenizer as Hugging Face tokenizer files, checked to give our ids.

We write what a Llama sentencepiece repository holds: `tokenizer.model` (the run's file,
unchanged), `tokenizer.json` (Hugging Face's own conversion of it, which fast loaders and
serving stacks read) and `tokenizer_config.json`. Two settings differ from Llama's defaults
because our training differs: documents are not prefixed with BOS (add_bos_token false), and
the tokenizer adds no dummy space before the text (add_prefix_space false)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pretrain.errors import PretrainError
from tokenizer import Tokenizer

# Words, runs of spaces and newlines, digits, punctuation, non-Latin text and an emoji (byte
# fallback): the places where a converted tokenizer could split differently.
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x  **  2  # 12345\n\n\tdone",
    "  leading spaces, trailing spaces   ",
    "Zürich, 東京, Москва 🤗 — «quotes» & <tags>",
    "\n\n",
)


def tokenizer_config(tokenizer: Tokenizer, max_seq_len: int) -> dict:
    """tokenizer_config.json, in keys both transformers 4.x and 5.x read."""
    piece = tokenizer.id_to_piece
    return {
        "tokenizer_class": "LlamaTokenizer",  # 4.x picks LlamaTokenizerFast for it; 5.x has one class
        "add_bos_token": False,  # training documents are not prefixed with BOS (each ends with EOS)
        "add_eos_token": False,
        "add_prefix_space": False,  # sentencepiece was trained with add_dummy_prefix=false
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.unk_id),
        "pad_token": piece(tokenizer.pad_id),
        "model_max_length": max_seq_len,
    }


def write_tokenizer(sp_model: Path, out_dir: Path, max_seq_len: int) -> None:
    """Write the tokenizer files into `out_dir` and check that AutoTokenizer loads them and
    encodes SAMPLE_TEXTS to the ids our Tokenizer gives."""
    from transformers import AutoTokenizer

    ours = Tokenizer.load(sp_model)
    config = json.dumps(tokenizer_config(ours, max_seq_len), indent=2) + "\n"
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(config)
    # tokenizer.json: converted by transformers from tokenizer.model with our config, in a scratch
    # directory, because save_pretrained also rewrites tokenizer_config.json in its own version's keys.
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True).save_pretrained(scratch)
        shutil.copyfile(Path(scratch) / "tokenizer.json", out_dir / "tokenizer.json")
    check_tokenizer(out_dir, ours)


def check_tokenizer(out_dir: Path, ours: Tokenizer) -> None:
    """Raise PretrainError unless AutoTokenizer.from_pretrained(out_dir) gives our ids and special ids."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)  # never the hub
    for text in SAMPLE_TEXTS:
        expected, got = ours.encode(text), hf.encode(text, verbose=False)
        if got != expected:
            raise PretrainError(f"{out_dir}: the exported tokenizer encodes {text!r} to {got} but the run's "
                                f"tokenizer to {expected}; the installed transformers converts this sentencepiece "
                                "model differently: please report it with both versions")
    special = {"bos": (hf.bos_token_id, ours.bos_id), "eos": (hf.eos_token_id, ours.eos_id),
               "pad": (hf.pad_token_id, ours.pad_id), "unk": (hf.unk_token_id, ours.unk_id)}
    for what, (got_id, expected_id) in special.items():
        if got_id != expected_id:
            raise PretrainError(f"{out_dir}: the exported tokenizer's {what} id is {got_id}, the run's is {expected_id}")
