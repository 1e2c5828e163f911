"""The paper memory estimate against hand computations (ZeRO paper accounting)."""

from __future__ import annotations

import pytest

from pretrain.models.args import ModelArgs, count_params
from pretrain.scaling.memory import (
    REFERENCE_SHAPES,
    activation_bytes,
    estimate_table,
    model_state_bytes,
    training_memory,
)

P = 7_000_000_000


def test_model_states_per_backend_by_hand():
    # ddp: 4 B weights + 4 B gradients + 8 B moments, on every GPU
    assert model_state_bytes(P, 8, "ddp").total == 16 * P
    # fsdp: the same 16 B sharded over 8
    assert model_state_bytes(P, 8, "fsdp").total == 2 * P
    # ZeRO paper, fig. 1 (K = 12, bf16): stage 1 = 2 + 2 + 12/N, stage 2 = 2 + 14/N, stage 3 = 16/N
    assert model_state_bytes(P, 64, "deepspeed", 1).total == pytest.approx((4 + 12 / 64) * P)
    assert model_state_bytes(P, 64, "deepspeed", 2).total == pytest.approx((2 + 14 / 64) * P)
    assert model_state_bytes(P, 64, "deepspeed", 3).total == pytest.approx(16 / 64 * P)
    # fp32 DeepSpeed keeps the fp32 master copy apart from the fp32 weights: 4 + 4 + 12
    assert model_state_bytes(P, 1, "deepspeed", 1, bf16=False).total == 20 * P
    with pytest.raises(ValueError, match="ZeRO stage 4"):
        model_state_bytes(P, 8, "deepspeed", 4)


def test_activations_by_hand():
    args = ModelArgs(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=8)
    kv_dim = 2 * 16
    # fp32 residual stream into both norms, then bf16 projection inputs, q, k, v, attention output, wo
    # input and the four SwiGLU tensors, per token per block
    block = 2 * 4 * 64 + 2 * (5 * 64 + 2 * kv_dim + 4 * 128)
    logits = 12 * 1000  # logits, fp32 log-softmax and its gradient
    assert activation_bytes(args, 8, 3) == 24 * (2 * block + logits)
    # full checkpointing: each block's fp32 input, plus the larger of the loss and one recomputed block
    assert activation_bytes(args, 8, 3, "full") == 24 * (2 * 4 * 64 + max(logits, block))
    assert activation_bytes(args, 8, 3, "selective", ac_every=2) == 24 * (block + 4 * 64 + max(logits, block))


def test_training_memory_adds_the_bf16_weight_copies_autocast_keeps():
    args = ModelArgs(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=8)
    n = count_params(args)
    ddp = training_memory(args, 8, 1, 4, "ddp")
    assert ddp.compute_copies == 2 * n and ddp.states.total == 16 * n
    assert ddp.total == ddp.states.total + ddp.activations + 2 * n
    assert training_memory(args, 8, 1, 4, "ddp", bf16=False).compute_copies == 0
    assert training_memory(args, 8, 1, 4, "deepspeed", 3).compute_copies == 0  # its weights are bf16 already


def test_reference_shapes_have_their_nominal_size_and_the_table_covers_them():
    sizes = {name: count_params(args) / 1e9 for name, args in REFERENCE_SHAPES.items()}
    assert sizes["7b"] == pytest.approx(7.2, abs=0.1)
    assert sizes["13b"] == pytest.approx(13.0, abs=0.1)
    assert sizes["70b"] == pytest.approx(69.0, abs=0.5)
    rows = estimate_table()
    assert len(rows) == 2 + 3 * 3
    seventy_on_512 = rows[-1].split()
    assert seventy_on_512[:3] == ["70b", "69.0B", "512"]
    # FSDP's 16 bytes per parameter over 512 GPUs
    assert float(seventy_on_512[7]) == pytest.approx(16 * count_params(REFERENCE_SHAPES["70b"]) / 512 / 2**30, abs=0.05)
