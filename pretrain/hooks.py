"""Eval hooks that ship with pretrain (see pretrain/evaluation/hook_runner.py for how hooks are called):

    eval:
      hooks: [pretrain.hooks:perplexity, pretrain.hooks:samples]
      hook_options:
        pretrain.hooks:perplexity: {text_file: heldout/finance_2024.txt}
        pretrain.hooks:samples: {prompts: ["The central bank", "def parse("], tokens: 64}

Both read the checkpoint from disk into one process (any backend, any world size), on the CPU by
default so that they never take memory from training on the GPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.config.schema import Config
from pretrain.errors import PretrainError


def _load(checkpoint: str, config: Config, device: str):
    from pretrain.export.parity import build_model
    from pretrain.export.weights import load_weights
    from tokenizer import Tokenizer

    model = build_model(config.model, load_weights(checkpoint)).to(device)
    return model, Tokenizer.load(Path(checkpoint) / "tokenizer.model")


@torch.no_grad()
def perplexity(checkpoint: str, step: int, config: Config, text_file: str, max_tokens: int = 65536,
               batch_size: int = 4, device: str = "cpu") -> dict:
    """Loss, perplexity and bits per byte of the checkpoint on a text file the run never saw,
    read in windows of data.seq_len tokens (documents separated by blank lines, joined by EOS)."""
    path = Path(text_file)
    if not path.is_file():
        raise PretrainError(f"pretrain.hooks:perplexity: text_file={text_file!r} does not exist; set "
                            "eval.hook_options['pretrain.hooks:perplexity'].text_file")
    model, tokenizer = _load(checkpoint, config, device)
    documents = [doc for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]
    ids = tokenizer.encode_documents(documents)[: max_tokens + 1]
    seq = config.data.seq_len
    windows = len(ids) // (seq + 1)
    if windows == 0:
        raise PretrainError(f"{text_file} holds {len(ids)} tokens, fewer than one window of data.seq_len={seq} + 1")
    batch = torch.from_numpy(ids[: windows * (seq + 1)].astype(np.int64)).view(windows, seq + 1)
    lengths = torch.from_numpy(tokenizer.token_byte_lengths())
    nats, size = 0.0, 0
    for start in range(0, windows, batch_size):
        rows = batch[start:start + batch_size]
        logits = model(rows[:, :-1].to(device))
        nats += float(F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten().to(device), reduction="sum"))
        size += int(lengths[rows[:, 1:]].sum())
    tokens = windows * seq
    return {"loss": nats / tokens, "ppl": math.exp(min(nats / tokens, 50.0)), "bpb": nats / (size * math.log(2)),
            "tokens": tokens}


def samples(checkpoint: str, step: int, config: Config, prompts: list[str] | None = None, tokens: int = 64,
            top_k: int = 1, temperature: float = 1.0, device: str = "cpu") -> dict:
    """Completions of a fixed list of prompts (default eval.sample_prompts), greedy unless top_k > 1,
    written to out_dir/eval/samples_step_<step>.txt, so checkpoints can be read side by side."""
    from pretrain.evaluation.generate import generate
    from pretrain.resilience.atomic_dir import write_file

    model, tokenizer = _load(checkpoint, config, device)
    generator = torch.Generator().manual_seed(config.train.seed)
    texts = []
    assert config.model.max_seq_len is not None  # a checkpoint's config has it derived
    for prompt in prompts if prompts is not None else config.eval.sample_prompts:
        new = generate(model, tokenizer.encode(prompt), tokens, config.model.max_seq_len, top_k, temperature,
                       stop_id=tokenizer.eos_id, generator=generator)
        texts.append(f"=== {prompt!r} ===\n{prompt}{tokenizer.decode(new)}\n")
    write_file(Path(config.out_dir) / "eval" / f"samples_step_{step:08d}.txt", "\n".join(texts))
    return {"samples": len(texts)}
