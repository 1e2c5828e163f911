"""Learning-rate schedules, optimizer parameter groups, and the engine's clipped update."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.models import ModelArgs, Transformer
from pretrain.optim import build_optimizer, build_scheduler, lr_multiplier
from pretrain.parallel.engine import TorchEngine


def test_linear_warmup_then_cosine_to_floor():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_multiplier(s, cfg, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    values = [lr_multiplier(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_flat_then_decays_linearly():
    cfg = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(50, cfg, 100) == lr_multiplier(79, cfg, 100) == 1.0
    assert lr_multiplier(80, cfg, 100) == pytest.approx(1.0)
    assert lr_multiplier(90, cfg, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg, 100) == pytest.approx(0.0)


def test_constant_and_no_warmup():
    cfg = OptimConfig(schedule="constant", warmup_steps=0)
    assert {lr_multiplier(s, cfg, 50) for s in range(50)} == {1.0}


def test_scheduler_drives_the_optimizer():
    model = Transformer(ModelArgs(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                  ffn_hidden=32, max_seq_len=8))
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg, max_steps=20)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert seen[-1] == pytest.approx(1e-3 * lr_multiplier(19, cfg, 20))
    assert not math.isclose(seen[-1], seen[4])


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelArgs(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                                  ffn_hidden=32, max_seq_len=8, tie_embeddings=True))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def gradients_after_engine_step(max_norm: float, approve=None) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """(the update TorchEngine.step applied with SGD at lr 1, i.e. the gradient it used; the raw
    gradient; the norm it returned)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    model(torch.randn(4, 6)).square().sum().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine = TorchEngine(model, optimizer, constant, torch.device("cpu"), autocast_bf16=False)
    norm = engine.step(max_norm, approve)
    assert all(p.grad is None for p in model.parameters())
    return [b - p.detach() for b, p in zip(before, model.parameters())], raw, float(norm)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6])
def test_engine_step_clips_as_clip_grad_norm_does(max_norm):
    applied, raw, norm = gradients_after_engine_step(max_norm)
    expected = [g.clone() for g in raw]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for p, g in zip(params, expected):
        p.grad = g
    torch_norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    assert norm == pytest.approx(float(torch_norm)) and norm > 0.5  # the 0.5 case does clip
    for got, p in zip(applied, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-7)


def test_engine_step_vetoed_leaves_weights_and_clears_gradients():
    asked = []
    applied, _, norm = gradients_after_engine_step(0.5, approve=lambda n: asked.append(float(n)) or False)
    assert asked == [norm] and all(torch.count_nonzero(update) == 0 for update in applied)
