"""The `pretrain` command: help, exit codes, one-paragraph errors without tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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
    prepare = pretrain("data", "prepare", "--help")
    assert prepare.returncode == 0 and "data.prepared_dir" in prepare.stdout


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


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch" / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable, **env})


def test_torchrun_launcher_passes_config_and_overrides(tmp_path, corpus_file, tokenizer_file):
    args = config_file_and_overrides(tmp_path, corpus_file, tokenizer_file, 2)
    result = launch("torchrun.sh", *args, NPROC="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    # two processes need a backend that spreads over them: the config check says so before any compute
    result = launch("torchrun.sh", *args, "--out_dir=" + str(tmp_path / "two"), NPROC="2")
    assert result.returncode != 0
    assert "parallel.backend='none' runs one process but WORLD_SIZE=2" in result.stderr


@pytest.mark.parametrize("backend", [["--parallel.backend=fsdp"],
                                     ["--parallel.backend=deepspeed", "--parallel.zero_stage=3"]])
def test_torchrun_launcher_trains_on_two_processes(backend, tmp_path, corpus_file, tokenizer_file):
    """The launcher's default on a machine without GPUs is 2 processes; rank 0 alone logs."""
    args = [*config_file_and_overrides(tmp_path, corpus_file, tokenizer_file, 30), "--train.micro_batch_size=2",
            "--train.global_batch_sequences=8", "--logging.every=1", "--checkpoint.every=30", *backend]
    result = launch("torchrun.sh", *args, **({"NPROC": ""} if "NPROC" in os.environ else {}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 ranks" in result.stdout and result.stdout.count("step 30/30") == 1
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_00000030" / "manifest.json").read_text())
    assert manifest["engine"] == ("deepspeed" if "deepspeed" in backend[0] else "dcp")


def test_slurm_script_starts_one_torchrun_per_node_meeting_on_the_first(tmp_path):
    """With srun and scontrol replaced by stand-ins that print what they are given."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (fake_bin / "scontrol").write_text('#!/bin/sh\nprintf "gpu-node-07\\ngpu-node-08\\n"\n')
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    result = launch("slurm.sbatch", "configs/demo.yaml", "--parallel.backend=fsdp", "--parallel.replicate=2",
                    PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[07-08]",
                    SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4", PYTHON="python3")
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("srun ")]
    assert ("python3 -m pretrain.torchrun --nnodes 2 --nproc_per_node 4 --max-restarts 3 --rdzv_id 4242 --rdzv_backend c10d "
            "--rdzv_endpoint gpu-node-07:29500 -m pretrain train configs/demo.yaml --parallel.backend=fsdp "
            "--parallel.replicate=2") in line
    for script, first_line in (("slurm.sbatch", "Multi-node launch"), ("torchrun.sh", "Single-node launch")):
        usage = launch(script, "--help").stdout
        assert usage.startswith(first_line) and "set -euo" not in usage  # the comment block, not the code


def test_slurm_script_passes_the_time_limit_signal_to_training_and_requeues(tmp_path):
    """USR1 (sent by Slurm 5 minutes before the time limit) becomes SIGTERM for the ranks, which
    checkpoint and exit 75; then the job requeues itself."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/bash\nsleep 60 & trap \'kill $!; echo "ranks got TERM"; exit 75\' TERM\n'
                                   'echo started > "$STARTED"\nwait\n')
    (fake_bin / "scontrol").write_text('#!/bin/sh\nif [ "$1" = requeue ]; then echo "requeue $2" >> "$LOG"; '
                                       'else echo node-1; fi\n')
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node-1", "PYTHON": "python3", "LOG": str(tmp_path / "log"),
           "STARTED": str(tmp_path / "started")}
    job = subprocess.Popen([str(REPO / "launch" / "slurm.sbatch"), "configs/demo.yaml"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=30)
    assert "ranks got TERM" in stdout, stdout + stderr
    assert (tmp_path / "log").read_text() == "requeue 4242\n"
    assert job.returncode == 75


def test_prepared_shards_train_exactly_like_text_and_a_changed_mixture_names_the_override(
        tmp_path, corpus_file, tokenizer_file, paragraphs_file):
    sources = (f"--data.sources=[{{name: topics, path: '{corpus_file}', weight: 0.4}}, "
               f"{{name: paragraphs, path: '{paragraphs_file}', weight: 0.6}}]")
    base = [*config_file_and_overrides(tmp_path, corpus_file, tokenizer_file, 6), sources]
    prepared = f"--data.prepared_dir={tmp_path / 'prepared'}"
    result = pretrain("data", "prepare", *base, prepared, "--workers=2")
    assert result.returncode == 0, result.stderr
    assert "topics: " in result.stdout and f"train on them with {prepared}" in result.stdout
    assert (tmp_path / "prepared" / "paragraphs" / "manifest.json").is_file()

    assert pretrain("train", *base, f"--out_dir={tmp_path / 'text'}").returncode == 0
    result = pretrain("train", *base, prepared, f"--out_dir={tmp_path / 'shards'}", "--checkpoint.every=3")
    assert result.returncode == 0, result.stderr
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("text", "shards")]
    assert losses[0] == losses[1] and len(losses[0]) == 6

    reweighted = sources.replace("weight: 0.4", "weight: 0.5").replace("weight: 0.6", "weight: 0.5")
    result = pretrain("train", *base, reweighted, prepared, f"--out_dir={tmp_path / 'shards'}", "--train.max_steps=9")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "data.sources[0].weight ('topics'): 0.4 in the checkpoint, 0.5 now" in result.stderr
    assert "--data.allow_changed_data=true" in result.stderr


def test_preflight_reports_each_check_and_passes(tmp_path, corpus_file, tokenizer_file):
    result = pretrain("preflight", "configs/demo.yaml", *tiny_overrides(tmp_path / "run", corpus_file, tokenizer_file),
                      "--checkpoint.every=5")
    assert result.returncode == 0, result.stderr[-2000:]
    labels = [line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")]
    assert labels == ["ranks", "matmul", "memory", "checkpoint", "result"], result.stdout
    assert "1 of 1 answered" in result.stdout and "TFLOP/s" in result.stdout and result.stdout.rstrip().endswith("ok")
    assert pretrain("preflight", "--help").returncode == 0


@pytest.mark.parametrize("command", ["preflight", "train"])
def test_a_model_too_big_for_this_machine_is_refused_before_training(command, tmp_path):
    import torch

    from pretrain.config import load_config
    from pretrain.hardware.memory_advice import device_memory_bytes, memory_estimate

    preset = "configs/presets/70b.yaml"
    needed = memory_estimate(load_config(str(REPO / preset), ["--train.device=cpu"]), 1, torch.device("cpu")).total
    if (device_memory_bytes(torch.device("cpu")) or 0) >= needed:
        pytest.skip(f"this machine has the {needed / 2**30:.0f} GiB per rank that the 70B preset needs on a CPU")
    result = pretrain(command, preset, f"--out_dir={tmp_path / 'run'}", "--train.device=cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "the estimate exceeds the device's memory" in output and "nothing fits in" in output
    assert "it would fit sharded over" in output and "--train.ignore_memory_check=true" in output
    assert not (tmp_path / "run" / "tokenizer.model").exists()  # stopped before the tokenizer is trained


@pytest.mark.parametrize("command", ["preflight", "train"])
def test_an_out_dir_that_cannot_be_written_stops_the_run_with_the_path(command, tmp_path, corpus_file,
                                                                      tokenizer_file):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # Root ignores permission bits; sysfs takes no new files from anyone.
    unwritable = Path("/sys/kernel") if os.geteuid() == 0 else tmp_path / "locked"
    if os.geteuid() != 0:
        unwritable.mkdir(mode=0o555)
    for out_dir, cause in [(blocker / "run", f"cannot be created: a parent, {blocker}, is a file"),
                           (unwritable, "cannot be written: [Errno 13] Permission denied")]:
        result = pretrain(command, "configs/demo.yaml", *tiny_overrides(out_dir, corpus_file, tokenizer_file))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"out_dir {out_dir} {cause}" in result.stdout + result.stderr


FORMS = {"script": [str(Path(sys.executable).parent / "pretrain")], "package": [sys.executable, "-m", "pretrain"],
         "module": [sys.executable, "-m", "pretrain.cli"]}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_documented_form_of_the_command_runs_it(form):
    """`pretrain ...` (the installed script), `python -m pretrain ...` and `python -m pretrain.cli ...`."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*FORMS[form], *args], cwd=REPO, capture_output=True, text=True, timeout=300)

    result = run("config", "configs/demo.yaml", "--train.max_steps=70")
    assert result.returncode == 0 and "max_steps: 70" in result.stdout, result.stderr[-2000:]
    result = run("config", "configs/demo.yaml", "--train.max_step=70")
    assert result.returncode == 2 and "did you mean 'max_steps'?" in result.stderr
    result = run("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: pretrain ")


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    result = pretrain("--version")
    assert result.returncode == 0 and result.stdout == f"pretrain {version('pretrain')}\n"


def test_data_prepare_without_prepared_dir_is_a_config_error_before_any_work(tmp_path):
    result = pretrain("data", "prepare", "configs/demo.yaml", f"--out_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "invalid configuration in configs/demo.yaml" in result.stderr
    assert "data.prepared_dir is not set" in result.stderr and "--data.prepared_dir=DIR" in result.stderr
    assert not (tmp_path / "run").exists()  # no tokenizer was trained
