"""`pretrain export`: Hugging Face and torch formats from DCP and DeepSpeed checkpoints, the
parity gate (and that it catches wrong weights), sharding, shape errors and the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency (the `test` extra): never skipped

from pretrain.checkpoint.layout import check_shapes
from pretrain.checkpoint.safe_load import weights_only_loads
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.errors import PretrainError
from pretrain.export import expected_shapes, load_weights
from pretrain.export import hf as hf_module
from pretrain.export.hf import export_hf
from pretrain.export.names import from_hf_name, strip_wrappers, to_hf_name
from pretrain.export.parity import build_model
from pretrain.export.shards import parse_size, plan_shards
from pretrain.export.torch_format import export_torch
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.distributed.ranks import run_ranks
from tests.distributed.runs import STEPS as TWO_RANK_STEPS
from tests.distributed.runs import rank_train
from tokenizer import Tokenizer

pytestmark = pytest.mark.slow

STEPS = 2
# The tied run also moves the RoPE base and norm epsilon off Hugging Face's defaults, and starts
# from large weights: at the usual init a 2-step model attends almost uniformly, whatever the RoPE.
RUNS = {"untied": {}, "tied": {"model__tie_embeddings": True, "model__rope_theta": 50000.0, "model__norm_eps": 1e-4,
                               "model__init_std": 0.3}}


def checkpoint_of(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{STEPS:08d}"


@pytest.fixture(scope="module")
def dcp_runs(tmp_path_factory, corpus_file, tokenizer_file) -> dict[str, tuple[Path, dict]]:
    """name -> (checkpoint dir, the trained model's final weights), one process (DCP checkpoints)."""
    runs = {}
    for name, extra in RUNS.items():
        run_dir = tmp_path_factory.mktemp(name)
        cfg = load_config(None, tiny_overrides(run_dir, corpus_file, tokenizer_file, train__max_steps=STEPS,
                                               checkpoint__every=STEPS, **extra), world_size=1)
        trainer = Trainer(cfg)
        trainer.train()
        runs[name] = checkpoint_of(run_dir), {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return runs


@pytest.fixture(scope="module", params=["zero3", "fsdp"])
def two_rank_run(request, tmp_path_factory, corpus_file, tokenizer_file) -> tuple[Path, dict]:
    """A checkpoint written by 2 ranks and the run's final weights: DeepSpeed's own format with
    parameters partitioned, a tied head and wrapped blocks (the session's shared ZeRO-3 run), or
    DCP with every parameter split between the two ranks' files."""
    if request.param == "zero3":
        run_dir = request.getfixturevalue("zero3_tied_two_ranks")
        checkpoint = run_dir / "checkpoints" / f"step_{TWO_RANK_STEPS:08d}"
    else:
        run_dir = tmp_path_factory.mktemp(request.param)
        run_ranks(rank_train, 2, run_dir, corpus_file, tokenizer_file,
                  {"train__max_steps": STEPS, "optim__warmup_steps": STEPS, "checkpoint__every": STEPS,
                   "eval__every": 0, "parallel__backend": "fsdp"})
        checkpoint = checkpoint_of(run_dir)
    weights = torch.load(run_dir / "weights.pt", weights_only=True)
    return checkpoint, {strip_wrappers(k): v for k, v in weights.items()}


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], value), name


@pytest.mark.parametrize("name", list(RUNS))
def test_hf_export_loads_in_transformers_with_the_same_logits(name, dcp_runs, tmp_path, tokenizer_file):
    ckpt, weights = dcp_runs[name]
    messages: list[str] = []
    out = export_hf(ckpt, tmp_path / "hf", progress=messages.append)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    gate = next(m for m in messages if m.startswith("parity: max |logit difference| = "))
    assert float(gate.split("= ")[1].split()[0]) < 1e-4, gate

    model = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert model.dtype == torch.float32
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Assignment statements are used to (re)bind names to values:\n\n    x = 12  # comment"
    ids = hf_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == Tokenizer.load(tokenizer_file).encode(text)  # no BOS: training adds none
    args = load_config(str(ckpt / "config.yaml"), [], world_size=1).model
    with torch.no_grad():
        ours = build_model(args, weights)(ids[:, :args.max_seq_len])
        theirs = model(input_ids=ids[:, :args.max_seq_len]).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert model.config.tie_word_embeddings == args.tie_embeddings
    assert_same_weights(load_weights(out), weights)  # the hf directory reads back exactly


def test_parity_gate_rejects_swapped_weights_and_leaves_nothing(dcp_runs, tmp_path, monkeypatch):
    ckpt, _ = dcp_runs["untied"]
    swap = {"layers.0.attention.wq.weight": "layers.0.attention.wo.weight",
            "layers.0.attention.wo.weight": "layers.0.attention.wq.weight"}  # same shape: only parity sees it
    monkeypatch.setattr(hf_module, "to_hf_name", lambda name, adapter: to_hf_name(swap.get(name, name), adapter))
    out = tmp_path / "hf"
    with pytest.raises(PretrainError, match=r"parity check failed: .* differ .* by up to"):
        export_hf(ckpt, out)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory


@pytest.mark.parametrize("dropped", [("rope_theta", "rope_parameters"), ("rms_norm_eps",)])
def test_parity_gate_sees_config_values(dropped, dcp_runs, tmp_path, monkeypatch):
    """Without these keys transformers uses its defaults (RoPE base 10000, eps 1e-6): wrong logits."""
    make_config = hf_module.hf_config
    monkeypatch.setattr(hf_module, "hf_config",
                        lambda *a: {k: v for k, v in make_config(*a).items() if k not in dropped})
    with pytest.raises(PretrainError, match="parity check failed"):
        export_hf(dcp_runs["tied"][0], tmp_path / "hf")


def test_sharded_export_has_an_index_and_loads(dcp_runs, tmp_path):
    ckpt, weights = dcp_runs["tied"]
    out = export_hf(ckpt, tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists() and "lm_head.weight" not in index["weight_map"]  # tied
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, weights["layers.1.feed_forward.w2.weight"])
    assert_same_weights(load_weights(out), weights)


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("two_rank_run", ["zero3"], indirect=True)
def test_a_deepspeed_checkpoint_that_would_run_code_is_refused(two_rank_run, tmp_path, capsys):
    """DeepSpeed's readers ask torch for full unpickling; the exporter forces weights-only loads."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_rank_run[0], ckpt)
    marker = tmp_path / "pwned"
    states = next((ckpt / "deepspeed").glob("*model_states.pt"))
    with weights_only_loads():
        state = torch.load(states, weights_only=True)
    torch.save({**state, "extra": RunsCode(str(marker))}, states)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][str(states.relative_to(ckpt))] = states.stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(ckpt), "--format", "torch", "--out", str(tmp_path / "out")]) == 1
    assert "posix.system" in capsys.readouterr().err and not marker.exists()


@pytest.mark.parametrize("two_rank_run", ["zero3"], indirect=True)
def test_deepspeeds_own_tools_read_our_zero_checkpoint_as_documented(two_rank_run, tmp_path):
    """DeepSpeed's converter finds the tag through the checkpoint's `latest` file, so its
    documented commands work unchanged: the function without a tag, and the zero_to_fp32.py
    script DeepSpeed copies into the checkpoint, run from inside it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt, weights = two_rank_run
    with weights_only_loads():
        converted = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert_same_weights({strip_wrappers(k): v.float() for k, v in converted.items()}, weights)
    # (--safe_serialization refuses the tied embedding and head: a limit of the script itself)
    script = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "out")],
                            cwd=ckpt, text=True,
                            capture_output=True, timeout=300)
    assert script.returncode == 0, script.stderr[-3000:]
    written = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    exported = {strip_wrappers(k): v for k, v in written.items()}
    assert exported.keys() == weights.keys()
    for name, value in weights.items():  # tied: the script writes the shared matrix under both names
        assert torch.equal(exported[name].float(), value), name


def test_two_rank_checkpoint_exports_the_runs_weights(two_rank_run, tmp_path):
    ckpt, weights = two_rank_run
    assert_same_weights(load_weights(ckpt), weights)
    out = export_hf(ckpt, tmp_path / "hf")  # passes the parity gate
    assert_same_weights(load_weights(out), weights)


@pytest.mark.parametrize("name", list(RUNS))
def test_torch_format_round_trip(name, dcp_runs, tmp_path):
    ckpt, weights = dcp_runs[name]
    out = export_torch(ckpt, tmp_path / "pt")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.pt", "tokenizer.model"]
    assert_same_weights(load_weights(out), weights)
    assert_same_weights(load_weights(out / "model.pt"), weights)
    assert load_config(str(out / "config.yaml"), [], world_size=1).model.tie_embeddings == (name == "tied")


def test_exported_files_follow_the_umask(dcp_runs, tmp_path):
    """safetensors writes through a private temporary file (0600); the export's files, like any
    file the user writes, get 0666 less the umask (directories 0777 less it), whatever writes them."""
    ckpt, _ = dcp_runs["tied"]
    previous = os.umask(0o022)
    try:
        outs = {(0o644, 0o755): [export_hf(ckpt, tmp_path / "hf", parity=False), export_torch(ckpt, tmp_path / "pt"),
                                 export_hf(ckpt, tmp_path / "shards", max_shard_bytes=100_000, parity=False)]}
        os.umask(0o027)
        outs[0o640, 0o750] = [export_hf(ckpt, tmp_path / "group", parity=False)]
    finally:
        os.umask(previous)
    for (file_mode, dir_mode), dirs in outs.items():
        for out in dirs:
            files = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
            assert any(name.endswith(".safetensors") or name == "model.pt" for name in files)
            assert set(files.values()) == {oct(file_mode)}, files
            assert stat.S_IMODE(out.stat().st_mode) == dir_mode


def test_export_needs_neither_the_runs_data_nor_its_tokenizer_path(dcp_runs, tmp_path, tokenizer_file):
    """The config is read for the model's shape only, so a checkpoint exports on another machine;
    the tokenizer comes from the checkpoint's own copy."""
    ckpt, weights = dcp_runs["untied"]
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    config = moved / "config.yaml"
    config.write_text(config.read_text().replace(str(tokenizer_file), "/gone/tokenizer.model")
                      .replace("corpus.txt", "gone.txt"))
    shutil.copyfile(tokenizer_file, moved / "tokenizer.model")  # as checkpoints hold it
    assert_same_weights(load_weights(export_torch(moved, tmp_path / "pt")), weights)
    (moved / "tokenizer.model").unlink()
    with pytest.raises(PretrainError, match=r"no tokenizer for .*copy the tokenizer the run used to"):
        export_hf(moved, tmp_path / "hf")


def test_check_shapes_names_the_parameter(dcp_runs, tmp_path):
    args = load_config(str(dcp_runs["untied"][0] / "config.yaml"), [], world_size=1).model
    wider_kv = dataclasses.replace(args, n_kv_heads=4)
    with pytest.raises(PretrainError, match=r"^src: parameter layers\.0\.attention\.wk\.weight has shape \(32, 64\) "
                                            r"in the checkpoint but \(64, 64\) in this model's config \(model\."
                                            r"n_layers=2, model\.d_model=64, model\.n_heads=4, model\.n_kv_heads=4\)"):
        check_shapes(expected_shapes(wider_kv), expected_shapes(args), "src", wider_kv)
    deeper = dataclasses.replace(args, n_layers=3)
    with pytest.raises(PretrainError, match=r"parameter layers\.2\.\S+ of this model's config is missing"):
        check_shapes(expected_shapes(deeper), load_weights(dcp_runs["untied"][0]), "src")
    with pytest.raises(PretrainError, match=r"has parameter layers\.1\.\S+, which this model's config does not have"):
        check_shapes(expected_shapes(dataclasses.replace(args, n_layers=1)), expected_shapes(args), "src")
    # a checkpoint whose config.yaml does not match its weights is refused before anything is written
    edited = tmp_path / "edited"
    shutil.copytree(dcp_runs["untied"][0], edited)
    config = edited / "config.yaml"
    config.write_text(config.read_text().replace("ffn_hidden: 128", "ffn_hidden: 256"))
    with pytest.raises(PretrainError, match=r"parameter layers\.0\.feed_forward\.w1\.weight has shape \(128, 64\) "
                                            r"in the checkpoint but \(256, 64\) .*model\.ffn_hidden=256"):
        export_torch(edited, tmp_path / "pt")
    assert not (tmp_path / "pt").exists()


def test_cli(dcp_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as help_exit:
        main(["export", "--help"])
    assert help_exit.value.code == 0 and "--no-parity-check" in capsys.readouterr().out

    assert main(["export", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "o")]) == 1
    assert "is not a complete checkpoint (no readable manifest.json)" in capsys.readouterr().err

    ckpt, weights = dcp_runs["untied"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(ckpt), "--format", "torch", "--out", str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["export", str(ckpt), "--format", "torch", "--out", str(out), "--force"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"exported {ckpt} to {out}\n" and "wrote model.pt" in captured.err
    assert not (out / "keep.txt").exists()
    assert_same_weights(load_weights(out), weights)

    hf_args = ["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert main([*hf_args, "--max-shard-size", "5 parsecs"]) == 1
    assert "--max-shard-size='5 parsecs' is not a size" in capsys.readouterr().err
    assert main([*hf_args, "--no-parity-check"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: --no-parity-check" in captured.err and "parity:" not in captured.err
    assert (tmp_path / "hf" / "model.safetensors").is_file() and captured.out.startswith("exported ")


def test_hf_without_transformers_says_what_to_install(dcp_runs, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    assert main(["export", str(dcp_runs["untied"][0]), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    assert "pip install 'pretrain[export]'" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_names_and_sizes(dcp_runs):
    args = load_config(str(dcp_runs["untied"][0] / "config.yaml"), [], world_size=1).model
    names = list(expected_shapes(args))
    assert [from_hf_name(to_hf_name(n)) for n in names] == names
    assert to_hf_name("layers.1.feed_forward.w3.weight") == "model.layers.1.mlp.up_proj.weight"
    assert strip_wrappers("module.layers.0._checkpoint_wrapped_module._orig_mod.attention.wq.weight") == \
        "layers.0.attention.wq.weight"
    with pytest.raises(PretrainError, match="'model.rotary_emb.inv_freq' is not a LlamaForCausalLM parameter"):
        from_hf_name("model.rotary_emb.inv_freq")
    assert (parse_size("5GB"), parse_size("2GiB"), parse_size("100kb"), parse_size("1000")) == (5 * 10**9, 2 * 2**30,
                                                                                               100_000, 1000)
    assert plan_shards({"a": 6, "b": 6, "c": 20, "d": 1}, 10) == [["a"], ["b"], ["c"], ["d"]]
    assert plan_shards({"a": 4, "b": 4, "c": 3}, 10) == [["a", "b"], ["c"]]
