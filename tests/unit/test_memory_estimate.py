"""The paper memory estimate against hand computations (ZeRO paper accounting)."""

from __future__ import annotations

import pytest

from pretrain.models.args import ModelArgs, count_params
from pretrain.scaling.memory import REFERENCE_SHAPES, activation_bytes, estimate_table, model_state_bytes

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
    per_block = (6 * 64 + 4 * kv_dim + 4 * 128) * 2  # bf16 elements per token per block
    logits = 2 * 4 * 1000
    assert activation_bytes(args, 8, 3) == 24 * (2 * per_block + logits)
    assert activation_bytes(args, 8, 3, "full") == 24 * (2 * 64 * 2 + per_block + logits)


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
