"""The `pretrain` command: help, exit codes, one-paragraph errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_metrics, tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def pretrain(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_commands_and_config_keys():
    top = pretrain("--help")
    assert top.returncode == 0 and "train" in top.stdout and "tokenizer" in top.stdout
    train = pretrain("train", "--help")
    assert train.returncode == 0
    for key in ("--model.n_kv_heads=", "--train.global_batch_tokens=", "--data.sources="):
        assert key in train.stdout
    assert pretrain("tokenizer", "train", "--help").returncode == 0


def test_impossible_shape_exits_2_with_one_paragraph():
    result = pretrain("train", "configs/demo.yaml", "--model.d_model=100", "--model.n_heads=3")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "model.d_model=100 is not divisible by model.n_heads=3" in result.stderr
    assert result.stderr.count("\n") <= 4


def test_unknown_key_and_bad_override_exit_2():
    result = pretrain("train", "configs/demo.yaml", "--optim.warmup_step=10", "--train.max_steps")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown key 'optim.warmup_step' in section 'optim'; did you mean 'warmup_steps'?" in result.stderr
    assert "overrides are written --section.key=value" in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = pretrain("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr


def test_bad_data_row_is_a_clear_error(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"document {i}"}) for i in range(50)))
    config = tmp_path / "c.yaml"
    config.write_text("out_dir: " + str(tmp_path / "run") + "\n")
    overrides = tiny_overrides(tmp_path / "run", data, tmp_path / "tok.model")
    result = pretrain("train", str(config), *overrides)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "no field 'text' (fields: body); set text_field" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_config_command_prints_resolved_yaml():
    result = pretrain("config", "configs/demo.yaml", "--train.max_steps=70")
    assert result.returncode == 0
    assert "max_steps: 70" in result.stdout and "max_seq_len: 128" in result.stdout


def test_tokenizer_train_command(tmp_path, corpus_file):
    config = tmp_path / "c.yaml"
    config.write_text(f"out_dir: {tmp_path / 'run'}\n")
    args = ["tokenizer", "train", str(config), f"--data.sources=[{{name: c, path: '{corpus_file}'}}]",
            "--tokenizer.vocab_size=400", "--model.vocab_size=400"]
    result = pretrain(*args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "tokenizer.model").is_file()
    assert "400 pieces" in result.stdout


def config_file_and_overrides(tmp_path: Path, corpus: Path, tokenizer: Path, max_steps: int) -> list[str]:
    """A config file that sets max_steps, followed by the tiny-model overrides for everything else,
    so that both the file and the overrides reach the run."""
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  max_steps: {max_steps}\n")
    overrides = [o for o in tiny_overrides(tmp_path / "run", corpus, tokenizer) if not o.startswith("--train.max_steps")]
    return [str(config), *overrides]


def test_short_training_run_through_the_cli(tmp_path, corpus_file, tokenizer_file):
    result = pretrain("train", *config_file_and_overrides(tmp_path, corpus_file, tokenizer_file, 3))
    assert result.returncode == 0, result.stderr
    assert "step 3/3" in result.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_torchrun_launcher_passes_config_and_overrides(tmp_path, corpus_file, tokenizer_file):
    args = [str(REPO / "launch" / "torchrun.sh"), *config_file_and_overrides(tmp_path, corpus_file, tokenizer_file, 2)]
    env = {**os.environ, "NPROC": "1", "PYTHON": sys.executable}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    # two processes need a sharding backend: the config check says so before any compute
    env["NPROC"] = "2"
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "parallel.backend='none' runs one process but WORLD_SIZE=2" in result.stderr
