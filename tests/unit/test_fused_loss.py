"""The chunked output-projection + cross-entropy equals the textbook head and loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import ModelArgs, Transformer
from pretrain.models.fused_loss import CHUNK_ELEMENTS, default_chunk_rows, linear_cross_entropy
from pretrain.models.transformer import IGNORE_INDEX


def textbook(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX)


def loss_and_grads(loss_fn, hidden, weight, labels, scale=1.0):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = loss_fn(hidden, weight, labels)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 1000])
def test_float64_equals_textbook_loss_and_gradients(chunk_rows):
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 16, dtype=torch.float64), torch.randn(101, 16, dtype=torch.float64)
    labels = torch.randint(0, 101, (37,))
    labels[[3, 10, 36]] = IGNORE_INDEX  # ignored rows count neither in the loss nor in its mean
    expected = loss_and_grads(textbook, hidden, weight, labels, scale=0.25)
    fused = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, IGNORE_INDEX, chunk_rows),
                           hidden, weight, labels, scale=0.25)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_bf16_autocast_matches_the_autocast_textbook_head():
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 32), torch.randn(500, 32) * 0.1
    labels = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y), hidden, weight, labels)
        fused = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=16), hidden, weight, labels)
    exact = loss_and_grads(textbook, hidden.double(), weight.double(), labels)
    assert fused[2].dtype == torch.float32  # the fp32 weight gets an fp32 gradient
    for got, want, truth in zip(fused, expected, exact):
        # bf16 matmuls: as close to the exact values as the autocast head is, within rounding
        assert (got.double() - truth).abs().max() <= 2 * (want.double() - truth).abs().max() + 1e-3


def test_without_gradients_only_the_loss_is_computed():
    torch.manual_seed(0)
    hidden, weight, labels = torch.randn(20, 8), torch.randn(30, 8, requires_grad=True), torch.randint(0, 30, (20,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=7)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, textbook(hidden, weight.detach(), labels))


def test_all_labels_ignored_gives_nan_like_cross_entropy():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.full((4,), IGNORE_INDEX)
    assert linear_cross_entropy(hidden, weight, labels).isnan() and textbook(hidden, weight, labels).isnan()


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_equals_loss_of_its_logits(tie):
    args = ModelArgs(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=80, max_seq_len=16,
                     tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(args).double()
    model.init_weights()
    tokens, labels = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    labels[0, :5] = IGNORE_INDEX
    F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(tokens, labels=labels).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("vocab_size", [512, 32000, 50257, 128256, 10**6])
def test_default_chunks_are_multiples_of_64_rows_within_the_logit_budget(vocab_size):
    rows = default_chunk_rows(vocab_size)
    assert rows % 64 == 0 and rows >= 64
    assert rows * vocab_size <= max(CHUNK_ELEMENTS, 64 * vocab_size) < (rows + 64) * vocab_size
