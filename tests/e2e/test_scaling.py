"""End to end: a planned config trains as written, and a sweep of tiny models on python-docs
fits a law that the planner then uses."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cli import build_parser, main
from pretrain.scaling.plan_output import SMOKE_OVERRIDES
from tests.conftest import TEST_VOCAB

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def small_vocabulary(tokenizer_file: Path) -> list[str]:
    """The session's tokenizer instead of training one per test."""
    return [f"--tokenizer.path={tokenizer_file}", f"--tokenizer.vocab_size={TEST_VOCAB}",
            f"--model.vocab_size={TEST_VOCAB}"]


def test_planned_config_trains_with_the_smoke_overrides_it_prints(tmp_path, tokenizer_file, capsys):
    config = tmp_path / "plan.yaml"
    assert main(["plan", "--gpus", "64", "--gpu", "h100", "--days", "21", "--write", str(config)]) == 0
    assert SMOKE_OVERRIDES in config.read_text()
    out = tmp_path / "smoke"
    code = main(["train", str(config), *shlex.split(SMOKE_OVERRIDES), f"--out_dir={out}",
                 *small_vocabulary(tokenizer_file)])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 2 and any("val_loss" in r for r in records)


def test_sweep_runs_an_isoflop_grid_on_cpu_then_fit_draws_it_and_the_planner_uses_the_law(
        tmp_path, tokenizer_file, capsys):
    sweep = tmp_path / "sweep"
    args = ["scaling", "sweep", str(REPO / "configs" / "demo.yaml"), "--flops", "5e10", "1.5e11", "--sizes", "3",
            "--out-dir", str(sweep), *small_vocabulary(tokenizer_file), "--data.seq_len=64",
            "--train.global_batch_tokens=2048", "--train.micro_batch_size=32", "--train.precision=fp32",
            "--logging.every=0"]
    assert main([*args, "--commands"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len([c for c in commands if c.startswith("pretrain train ")]) == 6
    assert all("--model.vocab_size=512" in c for c in commands if c.startswith("pretrain train "))

    assert main(args) == 0
    runs = sorted(p for p in sweep.iterdir() if (p / "config.yaml").is_file())
    assert len(runs) == 6
    law_file = tmp_path / "law.json"
    assert main(["scaling", "fit", str(sweep), "--out", str(law_file), "--bootstrap", "10",
                 "--target-params", "1M", "--target-tokens", "20M"]) == 0
    report = capsys.readouterr().out
    assert "alpha" in report and "predicted loss of 1e+06 parameters" in report
    fitted = json.loads(law_file.read_text())
    assert set(fitted["law"]) >= {"E", "A", "B", "alpha", "beta"} and len(fitted["runs"]) == 6
    assert fitted["target"]["loss"] > 0 and set(fitted["uncertainty"]) == {"E", "A", "B", "alpha", "beta"}
    png = law_file.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    assert main(["plan", "--law", str(law_file), "--flops", "1e12", "--vocab-size", str(TEST_VOCAB),
                 "--seq-len", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["law"]["alpha"] == pytest.approx(fitted["law"]["alpha"])
    assert plan["params"] > 0 and plan["predicted_loss"] > 0

    metrics = {run: (run / "metrics.jsonl").read_text() for run in runs}
    assert main(args) == 0  # a rerun finds every run finished and trains nothing
    assert metrics == {run: (run / "metrics.jsonl").read_text() for run in runs}


def test_every_launch_command_the_sweep_prints_trains_its_run(tmp_path, tokenizer_file, capsys):
    """The default launcher, and each one `scaling sweep --help` shows (torchrun on 1 process
    here), runs the printed line as it is in a shell: a run directory with its final val_loss."""
    with pytest.raises(SystemExit):
        main(["scaling", "sweep", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    examples = re.findall(r"'([^']*-m pretrain[^']*)'", help_text)
    assert "pretrain.cli" not in help_text and "python -m pretrain train" in examples
    assert "torchrun --nproc_per_node 8 -m pretrain train" in examples
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    for i, launcher in enumerate(["pretrain train", *(e.replace("--nproc_per_node 8", "--nproc_per_node 1")
                                                      for e in sorted(set(examples)))]):
        sweep = tmp_path / f"sweep{i}"
        # 1e10 FLOPs: the smallest shape trains 14 steps, the next too few (left out)
        assert main(["scaling", "sweep", str(REPO / "configs" / "demo.yaml"), "--flops", "1e10", "--sizes", "2",
                     "--out-dir", str(sweep), "--launcher", launcher, "--commands", *small_vocabulary(tokenizer_file),
                     "--data.seq_len=64", "--train.global_batch_tokens=2048", "--train.micro_batch_size=32",
                     "--train.precision=fp32", "--train.device=cpu", "--logging.every=0", "--eval.batches=2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        (command,) = [line for line in lines if not line.startswith("#")]
        assert command.startswith(launcher + " ")
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        (run,) = [p for p in sweep.iterdir() if p.is_dir()]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("step") == 14 and "val_loss" in r for r in records), command
        fit = [line for line in lines if line.startswith("# then: ")]
        assert fit == [f"# then: pretrain scaling fit {sweep}"]
        args = build_parser().parse_args(shlex.split(fit[0].removeprefix("# then: "))[1:])
        assert args.runs == [str(sweep)]
