"""The model seam: families by model.name (registry, config union, checks), and the second family,
GPT-2: its counts against the built module, its loss and masking, and parity with Hugging Face's
GPT2LMHeadModel."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml

from pretrain.checkpoint.manager import model_changes
from pretrain.config import config_reference, config_to_yaml, load_config, save_config
from pretrain.errors import ConfigError
from pretrain.evaluation.generate import generate
from pretrain.export.names import from_hf_name, from_hf_tensor, to_hf_name, to_hf_tensor
from pretrain.export.parity import build_model
from pretrain.models import GPT2, GPT2Args, ModelArgs, Transformer, count_params, flops_per_token, model_spec
from pretrain.scaling.memory import training_memory

SMALL = GPT2Args(vocab_size=97, d_model=48, n_layers=2, n_heads=6, ffn_hidden=80, max_seq_len=16)


def build(args: GPT2Args = SMALL, seed: int = 0) -> GPT2:
    """Built on meta and materialised as training does."""
    with torch.device("meta"):
        model = model_spec(args).build(args)
    model.to_empty(device="cpu")
    model.output.weight = model.tok_embeddings.weight  # to_empty unties (parallel.materialize ties again)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides), world_size=1)
    return info.value.problems


# ---- the registry and the config ----

def test_the_spec_is_found_by_name_or_by_args():
    assert model_spec("llama").build is Transformer and model_spec(ModelArgs()).name == "llama"
    assert model_spec("gpt2").build is GPT2 and model_spec(SMALL).args_class is GPT2Args
    with pytest.raises(ValueError, match="unknown model family 'gpt3'; pretrain knows llama, gpt2"):
        model_spec("gpt3")


def test_model_name_picks_the_family_and_llama_is_the_default(tmp_path):
    assert isinstance(load_config(None, [], world_size=1).model, ModelArgs)
    cfg = load_config(None, ["--model.name=gpt2", "--model.d_model=64", "--model.n_heads=4", "--data.seq_len=32",
                             f"--out_dir={tmp_path}"], world_size=1)
    assert cfg.model == GPT2Args(d_model=64, n_heads=4, max_seq_len=32)  # max_seq_len derived as for llama
    save_config(cfg, str(tmp_path))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["name"] == "gpt2"
    assert load_config(str(tmp_path / "config.yaml"), [], world_size=1) == cfg  # round trip


def test_llama_configs_are_written_as_before_and_a_model_without_name_is_llama(tmp_path):
    cfg = load_config(None, [], world_size=1)
    data = yaml.safe_load(config_to_yaml(cfg))
    assert "name" not in data["model"]  # config.yaml as before families existed: older versions read it
    assert load_config(None, ["--model.name=llama"], world_size=1) == cfg
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    assert load_config(str(tmp_path / "config.yaml"), [], world_size=1).model == ModelArgs(max_seq_len=1024)


def test_family_keys_and_names_are_checked():
    assert problems_of("--model.name=gpt3") == ["model.name='gpt3' is not one of 'llama', 'gpt2'; did you mean 'gpt2'?"]
    (problem,) = problems_of("--model.name=gpt2", "--model.n_kv_heads=2")
    assert problem == "model.n_kv_heads is a key of model.name=llama, not of model.name=gpt2; remove it, or set " \
                      "model.name=llama"
    (problem,) = problems_of("--model.name=gpt2", "--model.ffn_hiden=2")
    assert problem.startswith("unknown key 'model.ffn_hiden' in section 'model'; did you mean 'ffn_hidden'?")
    (problem,) = problems_of("--model.name=gpt2", "--model.d_model=100", "--model.n_heads=3")
    assert problem.startswith("model.d_model=100 is not divisible by model.n_heads=3")
    assert problems_of("--model.name=gpt2", "--model.init_std=0") == [
        "model.init_std=0.0 must be positive, e.g. 0.02"]


def test_help_lists_the_families_keys():
    text = config_reference()
    assert "--model.name=llama  ('llama' | 'gpt2')" in text
    assert "--model.n_kv_heads=8  (int)" in text  # llama's keys, as before
    gpt2 = text[text.index("[model] with model.name=gpt2: Hyper-parameters of GPT-2"):]
    assert "--model.ffn_hidden=3072  (int)  hidden width of the GELU MLP" in gpt2.split("[data]")[0]


def test_a_checkpoint_of_another_family_is_refused():
    llama_saved = {k: v for k, v in dataclasses.asdict(ModelArgs()).items() if k != "name"}  # an older config.yaml
    assert model_changes(llama_saved, SMALL) == ["model.name: 'llama' in the checkpoint, 'gpt2' now (another model "
                                                 "family)"]
    saved = dataclasses.asdict(SMALL)
    assert model_changes(saved, dataclasses.replace(SMALL, init_std=0.1)) == []
    # GPT-2's max_seq_len is the size of a trained tensor, not free as Llama's rotary length is
    assert model_changes(saved, dataclasses.replace(SMALL, max_seq_len=32)) == [
        "model.max_seq_len: 16 in the checkpoint, 32 now"]


# ---- GPT-2's numbers ----

def test_param_count_matches_the_module():
    model = build()
    distinct = sum(p.numel() for p in model.parameters())  # the tied head counts once
    assert count_params(SMALL) == distinct == 40_336
    embeddings = (SMALL.vocab_size + SMALL.max_seq_len) * SMALL.d_model
    assert count_params(SMALL, include_embeddings=False) == distinct - embeddings


def test_flops_per_token_by_hand():
    # GPT-2 small: d 768, 12 layers, 12 heads, ffn 3072, 50257 words, at seq 1024
    args = GPT2Args(vocab_size=50257, max_seq_len=1024)
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072  # q/k/v + output projection, c_fc + c_proj
    assert count_params(args) == 124_439_808  # Hugging Face's gpt2 checkpoint: 124,439,808 parameters
    assert flops_per_token(args, 1024) == 6 * (12 * per_layer + 50257 * 768) + 12 * 12 * 768 * 1024


def test_memory_estimate_uses_the_family_block():
    llama_like = ModelArgs(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=6, ffn_hidden=80,
                           max_seq_len=16)
    ours, theirs = (training_memory(a, 16, 2, 1, "none") for a in (SMALL, llama_like))
    # the same attention; GELU keeps 2 ffn-wide tensors per token where SwiGLU keeps 4
    assert theirs.activations - ours.activations == 16 * 2 * 2 * 2 * 2 * 80


# ---- GPT-2's module ----

def test_fused_loss_is_the_cross_entropy_of_the_logits():
    model = build().double()
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    labels = torch.randint(0, SMALL.vocab_size, (2, 16))
    labels[0, :3] = -100
    expected = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(tokens, labels=labels), expected)


def test_document_masking_keeps_packed_documents_apart():
    model = build().eval()
    tokens = torch.randint(0, SMALL.vocab_size, (1, 16))
    documents = torch.tensor([[0] * 5 + [1] * 11])
    changed = tokens.clone()
    changed[0, :5] = (changed[0, :5] + 1) % SMALL.vocab_size
    with torch.no_grad():
        assert torch.equal(model(tokens, documents)[0, 5:], model(changed, documents)[0, 5:])
        assert not torch.equal(model(tokens)[0, 5:], model(changed)[0, 5:])


def test_init_is_seeded_tied_and_generates():
    a, b = build(seed=3), build(seed=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.output.weight is a.tok_embeddings.weight
    assert a.layers[0].attention.wqkv.bias.abs().sum() == 0 and a.norm.weight.eq(1).all()
    assert len(generate(a.eval(), [1, 2, 3], max_new_tokens=20, max_seq_len=SMALL.max_seq_len)) == 20


def test_matches_hugging_face_gpt2(tmp_path):
    """Our names and transposes into GPT2LMHeadModel give its logits; the weights read back exactly."""
    args = dataclasses.replace(SMALL, init_std=0.3, norm_eps=1e-4)  # large weights: a wrong op shows
    model = build(args)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # biases and norm gains away from their 0 and 1 init
                param.add_(torch.randn_like(param) * 0.2)
    adapter = model_spec(args).hf
    weights = {n: t for n, t in model.state_dict().items() if n != "output.weight"}
    hf_weights = {to_hf_name(n, adapter): to_hf_tensor(n, t, adapter) for n, t in weights.items()}
    config = transformers.GPT2Config(**{k: v for k, v in adapter.config(args).items() if k != "architectures"})
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    missing, unexpected = hf_model.load_state_dict(hf_weights, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied: Hugging Face shares wte
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    with torch.no_grad():
        ours = build_model(args, dict(model.state_dict()))(tokens)
        theirs = hf_model(input_ids=tokens).logits
    assert (ours - theirs).abs().max() < 1e-4
    back = {from_hf_name(n, adapter): t for n, t in hf_weights.items()}
    assert all(torch.equal(from_hf_tensor(n, back[n], adapter), weights[n]) for n in weights)
