"""Techniques applied from outside the model: activation checkpointing and torch.compile change
how a step runs, never what it computes; initialisation does not depend on the backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.errors import ConfigError
from pretrain.models import Transformer
from pretrain.models.fused_loss import softmax_cross_entropy_grad
from pretrain.parallel import DistInfo, ParallelDims, build_engine

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def engine_for(cfg):
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return build_engine(model, cfg, CPU, ParallelDims.from_config(cfg.parallel, 1), "fp32")


def loss_and_grads(engine, tokens):
    """The training path: the fused head-and-loss (its compiled kernel when compiled)."""
    loss = engine.model(tokens[:, :-1], labels=tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in engine.model.named_parameters()}


@pytest.mark.parametrize("mode, wrapped", [("full", [0, 1, 2]), ("selective", [0, 2])])
def test_activation_checkpointing_recomputes_the_same_gradients(tiny_config, mode, wrapped):
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    plain = engine_for(tiny_config(model__n_layers=3))
    checkpointed = engine_for(tiny_config(model__n_layers=3, parallel__activation_checkpointing=mode))
    forward_calls = [0] * 3
    for i, layer in enumerate(checkpointed.model.layers):
        layer.attention.register_forward_pre_hook(lambda *_, i=i: forward_calls.__setitem__(i, forward_calls[i] + 1))
    # the model's own parameter names, in every state dict (no wrapper prefix)
    assert checkpointed.model.state_dict().keys() == plain.model.state_dict().keys()
    loss, grads = loss_and_grads(plain, tokens)
    loss_ac, grads_ac = loss_and_grads(checkpointed, tokens)
    assert [i for i, calls in enumerate(forward_calls) if calls == 2] == wrapped  # recomputed in backward
    assert torch.equal(loss, loss_ac)
    assert grads.keys() == grads_ac.keys()
    for name, grad in grads_ac.items():
        assert torch.equal(grad, grads[name]), name


def test_tied_head_stays_tied_to_the_embedding_after_materialising(tiny_config):
    """Leaving the meta device re-creates every parameter; the tie must survive it (an untied
    head would start from uninitialised memory)."""
    model = engine_for(tiny_config(model__tie_embeddings=True)).model
    assert model.output.weight is model.tok_embeddings.weight
    untied = engine_for(tiny_config()).model
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_activation_checkpointing_leaves_the_initial_weights_alone(tiny_config):
    """Wrapping blocks does not change the order of the seeded draws; another seed gives another model.
    (That sharding does not change them either is part of the 2-rank parity tests.)"""
    a = engine_for(tiny_config()).model.state_dict()
    b = engine_for(tiny_config(parallel__activation_checkpointing="full")).model.state_dict()
    c = engine_for(tiny_config(train__seed=1)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])


@pytest.mark.slow
def test_compiled_blocks_compute_what_eager_blocks_do(tiny_config):
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    loss, grads = loss_and_grads(engine_for(tiny_config()), tokens)
    compiled = engine_for(tiny_config(train__compile=True))
    loss_c, grads_c = loss_and_grads(compiled, tokens)
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in compiled.model.layers)
    assert compiled.model.output.loss_kernel is not softmax_cross_entropy_grad  # the compiled one
    with torch.no_grad():
        logits = compiled.model(tokens[:, :-1])  # the head without the loss
    torch.testing.assert_close(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()), loss,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_setting_and_auto_decision(tiny_config, monkeypatch):
    from pretrain.parallel import compile as compile_module

    cpu = torch.device("cpu")
    assert compile_module.compile_decision(tiny_config(train__compile=True), cpu, "fp32", 1)[0] is True
    assert compile_module.compile_decision(tiny_config(train__compile=False), cpu, "fp32", 1)[0] is False
    assert compile_module.compile_decision(tiny_config(parallel__compile=True), cpu, "fp32", 1)[0] is True
    with pytest.raises(ConfigError, match="contradicts train.compile=false"):
        tiny_config(parallel__compile=True, train__compile=False)
    compile_it, why = compile_module.compile_decision(tiny_config(), cpu, "fp32", 1)  # 20 tiny steps
    assert not compile_it and "too short" in why
    monkeypatch.setattr(compile_module, "measure_matmul_flops", lambda *a, **k: 1e9)  # a slow CPU
    long_run = tiny_config(train__max_steps=10**10)
    compile_it, why = compile_module.compile_decision(long_run, cpu, "fp32", 1)
    assert compile_it and "min of compute" in why
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    compile_it, why = compile_module.compile_decision(long_run, cpu, "fp32", 1)
    assert not compile_it and "no C++ compiler" in why
