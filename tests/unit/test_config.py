"""Config loading, overrides and every validation rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pretrain.config import Config, config_reference, grad_accum_steps, load_config, save_config
from pretrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")


def problems_of(*overrides: str, path: str | None = DEMO, world_size: int = 1) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), world_size=world_size)
    return info.value.problems


def test_demo_loads_and_derives_values():
    cfg = load_config(DEMO, [], world_size=1)
    assert cfg.model.max_seq_len == cfg.data.seq_len == 128
    assert cfg.train.global_batch_tokens == 2048
    assert grad_accum_steps(cfg, 1) == 2 and grad_accum_steps(cfg, 2) == 1


def test_overrides_parse_as_yaml_and_are_typed():
    cfg = load_config(DEMO, [
        "--optim.lr=3e-4", "--train.max_steps=1e3", "--model.tie_embeddings=false",
        "--data.sources=[{name: a, path: python-docs, weight: 2}]", "--out_dir=/tmp/x",
        "--eval.sample_prompts=[hello, 'two words']", "--model.rope_theta=500000",
    ], world_size=1)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.tie_embeddings is False
    assert cfg.data.sources[0].name == "a" and cfg.data.sources[0].weight == 2.0
    assert cfg.data.sources[0].text_field == "text"  # default filled inside list items
    assert cfg.out_dir == "/tmp/x"
    assert cfg.eval.sample_prompts == ["hello", "two words"]
    assert cfg.model.rope_theta == 500000.0


def test_yaml_file_reads_exponent_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\ntrain:\n  max_steps: 1e2\n")
    cfg = load_config(str(path), [], world_size=1)
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 100


def test_config_is_read_only():
    cfg = load_config(DEMO, [], world_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 5


def test_unknown_keys_get_did_you_mean():
    problems = problems_of("--optim.learning_rate=1e-3", "--modle.d_model=5", "--train.max_step=3",
                           "--data.sources=[{name: a, path: python-docs, wieght: 1}]")
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "unknown key 'optim.learning_rate'" in text
    assert "did you mean 'modle'" not in text and "did you mean 'model'?" in text
    assert "did you mean 'max_steps'?" in text
    assert "'data.sources[0].wieght'" in text and "did you mean 'weight'?" in text


def test_wrong_types_name_key_value_and_expected_type():
    problems = problems_of("--model.d_model=wide", "--train.max_steps=2.5", "--model.tie_embeddings=1",
                           "--optim.lr=fast", "--data.sources=python-docs", "--train.precision=fp16")
    text = "\n".join(problems)
    assert "model.d_model='wide' has the wrong type: expected a whole number" in text
    assert "train.max_steps=2.5 has the wrong type" in text
    assert "model.tie_embeddings=1 has the wrong type: expected true or false" in text
    assert "optim.lr='fast' has the wrong type: expected a number" in text
    assert "data.sources='python-docs' must be a list" in text
    assert "train.precision='fp16' is not one of 'auto', 'fp32', 'bf16'" in text


def test_heads_must_divide_width_with_suggestions():
    (problem,) = problems_of("--model.d_model=100", "--model.n_heads=3", "--model.n_kv_heads=1")
    assert "model.d_model=100 is not divisible by model.n_heads=3" in problem
    assert "{1, 2, 4, 5, 10, 20, 25, 50, 100}" in problem


def test_kv_heads_must_divide_heads():
    (problem,) = problems_of("--model.n_kv_heads=3")
    assert "model.n_heads=4 is not divisible by model.n_kv_heads=3" in problem
    assert "choose n_kv_heads in {1, 2, 4}" in problem


def test_odd_head_dim_is_rejected_for_rope():
    (problem,) = problems_of("--model.d_model=36", "--model.n_heads=4", "--model.n_kv_heads=4")
    assert "is odd" in problem and "rotary" in problem


def test_global_batch_divisibility_messages():
    (problem,) = problems_of("--train.global_batch_tokens=2048", "--train.micro_batch_size=6")
    assert "global batch of 16 sequences is not divisible by train.micro_batch_size=6 x world size 1 = 6" in problem
    assert "set the global batch to 1536 or 2304 tokens" in problem
    (problem,) = problems_of("--train.global_batch_tokens=2000")
    assert "train.global_batch_tokens=2000 is not a positive multiple of data.seq_len=128; use e.g. 1920 or 2048" in problem
    problems = problems_of("--train.global_batch_tokens=2048", "--train.micro_batch_size=16", world_size=2)
    assert any("train.micro_batch_size=16 x world size 2 = 32" in p for p in problems)


def test_global_batch_in_sequences_or_default():
    cfg = load_config(DEMO, ["--train.global_batch_sequences=32", "--train.global_batch_tokens=null"], world_size=1)
    assert cfg.train.global_batch_tokens == 32 * 128 and grad_accum_steps(cfg, 1) == 4
    cfg = load_config(DEMO, ["--train.global_batch_tokens=null"], world_size=1)
    assert cfg.train.global_batch_tokens == 8 * 128  # one micro-batch per rank
    (problem,) = problems_of("--train.global_batch_sequences=32")
    assert "give only one of train.global_batch_tokens and train.global_batch_sequences" in problem
    (problem,) = problems_of("--train.global_batch_sequences=20", "--train.global_batch_tokens=null")
    assert "set the global batch to 16 or 24 sequences" in problem


def test_many_problems_are_reported_together():
    problems = problems_of("--model.d_model=100", "--model.n_heads=3", "--optim.lr=-1",
                           "--train.stop_at=5000", "--data.seq_len=1")
    assert len(problems) >= 4
    text = "\n".join(problems)
    for key in ("model.d_model=100", "optim.lr=-1", "train.stop_at=5000", "data.seq_len=1"):
        assert key in text


def test_missing_data_path_and_bad_suffix(tmp_path):
    problems = problems_of(f"--data.sources=[{{name: a, path: '{tmp_path}/nope/*.jsonl'}}, "
                           f"{{name: b, path: '{tmp_path}/x.csv'}}, {{name: a, path: python-docs}}]")
    text = "\n".join(problems)
    assert "matches no file" in text and "nope/*.jsonl" in text
    assert "unsupported file type" in text and "x.csv" in text
    assert "name='a' is used by more than one source" in text


def test_backend_none_rejects_several_processes():
    (problem,) = problems_of("--train.micro_batch_size=8", world_size=2)
    assert "parallel.backend='none' runs one process but WORLD_SIZE=2" in problem


def test_parallel_options_belong_to_their_backend_and_mesh_fits_world():
    problems = problems_of("--parallel.backend=ddp", "--parallel.replicate=2", "--parallel.cpu_offload=true",
                           "--parallel.offload_params=true", "--parallel.deepspeed={zero_optimization: {}}",
                           "--train.micro_batch_size=4", world_size=4)
    assert len(problems) == 4
    assert "parallel.replicate=2 / parallel.shard=None describe an FSDP (HSDP) mesh but parallel.backend='ddp'" \
        in problems[0]
    assert "offload_params=true needs --parallel.backend=deepspeed --parallel.zero_stage=3" in problems[1]
    assert "cpu_offload=true is an FSDP option" in problems[2]
    assert "parallel.deepspeed holds DeepSpeed keys but parallel.backend='ddp'" in problems[3]
    (problem,) = problems_of("--parallel.backend=fsdp", "--parallel.replicate=3", "--train.micro_batch_size=4",
                             world_size=4)
    assert "parallel.replicate=3 x parallel.shard=1 must equal the world size 4; choose replicate in {1, 2, 4}" \
        in problem
    hsdp = load_config(DEMO, ["--parallel.backend=fsdp", "--parallel.replicate=2", "--parallel.shard=2",
                              "--train.micro_batch_size=4"], world_size=4)
    assert (hsdp.parallel.replicate, hsdp.parallel.shard) == (2, 2)


def test_deepspeed_keys_derived_from_our_config_are_refused():
    problems = problems_of("--parallel.backend=deepspeed", "--parallel.deepspeed={gradient_clipping: 0.5, "
                           "zero_optimization: {stage: 3, reduce_bucket_size: 1000}, zero_force_ds_cpu_optimizer: false}")
    assert problems == ["parallel.deepspeed.gradient_clipping is set from our config; set optim.grad_clip instead",
                        "parallel.deepspeed.zero_optimization.stage is set from our config; set parallel.zero_stage "
                        "instead"]


def test_generated_deepspeed_config_follows_ours_and_merges_extra_keys():
    from pretrain.parallel.deepspeed_engine import deepspeed_config

    cfg = load_config(DEMO, ["--parallel.backend=deepspeed", "--parallel.zero_stage=3", "--optim.grad_clip=0.5",
                             "--parallel.offload_params=true",
                             "--parallel.deepspeed={zero_optimization: {reduce_bucket_size: 1000}}"], world_size=2)
    ds = deepspeed_config(cfg, dp_size=2, bf16=True, on_gpu=False)
    # demo: 2048 tokens = 16 sequences of 128 per step, micro-batches of 8, so 2 ranks need no accumulation
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 8, 1)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000,  # the user's value wins
                                       "stage3_prefetch_bucket_size": int(0.9 * 256 * 256),
                                       "stage3_param_persistence_threshold": 2560,
                                       "offload_param": {"device": "cpu", "pin_memory": False}}
    on_gpu = deepspeed_config(cfg, dp_size=2, bf16=True, on_gpu=True)["zero_optimization"]
    assert on_gpu["overlap_comm"] is True and on_gpu["offload_param"]["pin_memory"] is True


def test_unreadable_file_and_bad_yaml(tmp_path):
    assert "cannot read config file" in problems_of(path=str(tmp_path / "missing.yaml"))[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: [\n")
    assert "is not valid YAML" in problems_of(path=str(bad))[0]
    assert "overrides are written --section.key=value" in problems_of("--train.max_steps", "5")[0]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["--train.global_batch_sequences=32", "--train.global_batch_tokens=null"], world_size=1)
    assert cfg.train.global_batch_tokens == 32 * 128
    path = save_config(cfg, str(tmp_path))
    assert load_config(str(path), [], world_size=1) == cfg
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("path", sorted(str(p) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path, [], world_size=1)
    assert isinstance(cfg, Config)


def test_reference_lists_every_key():
    text = config_reference()
    for key in ("--out_dir=", "--model.n_kv_heads=", "--data.sources=", "--train.stop_at=", "--optim.lr=",
                "--eval.every=", "--checkpoint.every=", "--logging.every=", "--parallel.backend="):
        assert key in text
