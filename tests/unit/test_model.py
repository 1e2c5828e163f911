"""The transformer: shapes, causality, GQA, rotary embeddings, init, parameter and FLOP counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import ModelArgs, Transformer, count_params, flops_per_token, matmul_params
from pretrain.models.layers import apply_rope, rope_tables

SMALL = ModelArgs(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=80, max_seq_len=16)


def build(args: ModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    torch.manual_seed(seed)  # init_weights depends only on the RNG state when it is called
    model.init_weights()
    return model


def test_logits_shape():
    tokens = torch.randint(0, SMALL.vocab_size, (3, 11))
    assert build(SMALL)(tokens).shape == (3, 11, SMALL.vocab_size)


def test_future_tokens_do_not_change_past_logits():
    model = build(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % SMALL.vocab_size
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=0)
    assert (before[:, 9:] - after[:, 9:]).abs().max() > 1e-3  # the change does reach later positions


def test_document_masking_keeps_packed_documents_apart():
    model = build(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    document_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    changed = tokens.clone()
    changed[0, :6] = (changed[0, :6] + 1) % SMALL.vocab_size  # rewrite row 0's first document
    masked, masked_changed = model(tokens, document_ids), model(changed, document_ids)
    # the second document of row 0 never sees the first one...
    torch.testing.assert_close(masked[0, 6:], masked_changed[0, 6:], rtol=0, atol=1e-6)
    # ...and, rotary embeddings being relative, gives the logits it gives when fed alone
    torch.testing.assert_close(masked[0, 6:], model(tokens[:1, 6:])[0], rtol=1e-4, atol=1e-4)
    # one document per row is plain causal attention
    torch.testing.assert_close(masked[1], model(tokens)[1], rtol=1e-5, atol=1e-6)
    # without masking the first document does reach the second
    assert (model(tokens)[0, 6:] - model(changed)[0, 6:]).abs().max() > 1e-3


def test_gqa_equals_mha_with_repeated_key_value_heads():
    gqa = build(SMALL)
    mha = build(ModelArgs(**{**SMALL.__dict__, "n_kv_heads": SMALL.n_heads}), seed=1)
    group, head_dim = SMALL.n_heads // SMALL.n_kv_heads, SMALL.head_dim
    with torch.no_grad():
        for name, param in mha.named_parameters():
            source = dict(gqa.named_parameters())[name]
            if name.endswith(("attention.wk.weight", "attention.wv.weight")):
                # each kv head serves `group` consecutive query heads
                source = source.view(SMALL.n_kv_heads, head_dim, -1).repeat_interleave(group, dim=0)
                source = source.reshape(param.shape)
            param.copy_(source)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_attention_matches_explicit_causal_softmax():
    args = ModelArgs(**{**SMALL.__dict__, "n_kv_heads": SMALL.n_heads})
    attention = build(args).layers[0].attention
    x = torch.randn(2, 10, args.d_model)
    cos, sin = rope_tables(args.head_dim, 10, args.rope_theta)
    split = lambda t: t.view(2, 10, args.n_heads, args.head_dim).transpose(1, 2)  # noqa: E731
    q = apply_rope(split(attention.wq(x)), cos, sin)
    k = apply_rope(split(attention.wk(x)), cos, sin)
    v = split(attention.wv(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(args.head_dim)
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    expected = attention.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, -1))
    torch.testing.assert_close(attention(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> torch.Tensor:
        rq = apply_rope(q.view(1, 1, 1, 8), cos[i], sin[i])
        rk = apply_rope(k.view(1, 1, 1, 8), cos[j], sin[j])
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(apply_rope(q.view(1, 1, 1, 8), cos[7], sin[7]).norm(), q.norm())


def test_meta_build_then_init_is_seeded_and_complete():
    with torch.device("meta"):
        model = Transformer(SMALL)
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    reference = build(SMALL, seed=3)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.rope_cos, reference.rope_cos)
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


def test_init_scales_residual_projections():
    args = ModelArgs(vocab_size=64, d_model=256, n_layers=8, n_heads=4, n_kv_heads=4, ffn_hidden=512,
                     max_seq_len=8, init_std=0.02)
    model = build(args)
    layer = model.layers[0]
    # truncation at 3 std shrinks the std by ~1.3%
    assert layer.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer.attention.wq.weight.abs().max() <= 3 * 0.02
    assert torch.equal(layer.attention_norm.weight, torch.ones(256))


def test_tied_embeddings_share_storage():
    model = build(ModelArgs(**{**SMALL.__dict__, "tie_embeddings": True}))
    assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_module(tie):
    args = ModelArgs(**{**SMALL.__dict__, "tie_embeddings": tie})
    model = build(args)
    assert count_params(args) == sum(p.numel() for p in model.parameters())
    assert count_params(args, include_embeddings=False) == count_params(args) - args.vocab_size * args.d_model


def test_param_and_flop_counts_by_hand():
    # d=512, 8 layers, 8 heads (head_dim 64), 2 kv heads, SwiGLU 1408, vocab 32000, untied.
    args = ModelArgs(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_hidden=1408)
    q_and_o = 2 * 512 * 512              # 524,288
    k_and_v = 2 * 512 * 128              # 131,072
    mlp = 3 * 512 * 1408                 # 2,162,688
    per_layer = q_and_o + k_and_v + mlp  # 2,818,048
    head = 32000 * 512                   # 16,384,000
    assert matmul_params(args) == 8 * per_layer + head == 38_928_384
    norms = 8 * 2 * 512 + 512
    assert count_params(args) == 8 * per_layer + norms + 2 * head == 55_321_088
    assert count_params(args, include_embeddings=False) == 8 * per_layer + norms + head == 38_937_088
    # 6 per matmul weight + attention 12 * layers * heads * head_dim * seq
    assert flops_per_token(args, seq_len=512) == 6 * 38_928_384 + 12 * 8 * 512 * 512 == 258_736_128


def test_bf16_autocast_forward_and_backward():
    model = build(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("seq", [5, 128, 300])
def test_blocked_causal_attention_equals_sdpa(seq):
    from pretrain.models.causal_attention import blocked_causal_attention

    torch.manual_seed(0)
    q = torch.randn(2, 6, seq, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, seq, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, 6, seq, 8, dtype=torch.float64)
    results = []
    for attend in (blocked_causal_attention,
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)):
        out = attend(q, k, v)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
