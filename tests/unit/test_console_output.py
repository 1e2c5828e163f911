"""What reaches the console: metric lines (eval hooks with their numbers, no bare `step N`),
`pretrain eval`'s line, and the capture that keeps a compiler's output out of the log."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pretrain.evaluation.validation import describe_record
from pretrain.observability.log_setup import output_captured
from pretrain.observability.metrics import MetricLogger, format_record


def test_an_eval_hook_record_shows_its_numbers():
    line = format_record({"step": 10, "eval/finance_terms/acc": 0.41, "eval/finance_terms/n": 1200,
                          "eval/perplexity/ppl": 17.123456})
    assert line == "step 10 | eval/finance_terms/acc 0.41 | eval/finance_terms/n 1,200 | eval/perplexity/ppl 17.123"


def test_a_record_with_nothing_to_show_prints_nothing(tmp_path, caplog):
    """The trainer's checkpoint timing record: the checkpoint code logs its own line."""
    checkpoint = {"step": 400, "tokens": 819200, "checkpoint_blocked_s": 0.12, "checkpoint_async": False}
    assert format_record(checkpoint) == ""
    logger = MetricLogger(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="pretrain"):
        logger.log(checkpoint)
        logger.log({"step": 400, "eval/arc/acc": 0.5})
        logger.log({"step": 400, "max_steps": 800, "loss": 3.25, "lr": 1e-3})
    logger.close()
    assert caplog.messages == ["step 400 | eval/arc/acc 0.5", "step 400/800 | loss 3.2500 | lr 1.00e-03"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # every record is still written


def test_pretrain_eval_line():
    record = {"step": 400, "tokens": 819200, "checkpoint": "runs/demo/checkpoints/step_00000400", "val_loss": 3.12345,
              "val_ppl": 22.7168, "val_bpb": 1.23456, "val_ppl_by_source": {"fin": 18.2, "web": 30.0}}
    assert describe_record(record) == ("evaluated runs/demo/checkpoints/step_00000400 (step 400): val_loss 3.1235 "
                                       "(ppl 22.72, 1.235 bits/byte) | fin ppl 18.20 | web ppl 30.00")


WRITE_BOTH = "import os; os.write(1, b'gcc -O3 -c cpu_adam.cpp\\n'); os.write(2, b'warning: unused variable\\n')"


def test_captured_output_of_a_subprocess_stays_out_of_the_log(capfd, caplog):
    with output_captured("building an op"):
        subprocess.run([sys.executable, "-c", WRITE_BOTH], check=True)  # inherits descriptors 1 and 2
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == ""
    assert caplog.messages == []


def test_captured_output_is_shown_when_the_block_fails(capfd, caplog):
    with pytest.raises(subprocess.CalledProcessError):
        with output_captured("building an op", tail_lines=1):
            subprocess.run([sys.executable, "-c", WRITE_BOTH + "; raise SystemExit(1)"], check=True)
    out, err = capfd.readouterr()
    # only through the log line, not the raw streams (a stale log handler of an earlier test may
    # print a "Logging error" whose traceback quotes the command: not a line of the compiler's own)
    assert not [line for line in (out + err).splitlines() if line.startswith(("gcc", "warning: unused"))]
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert message == "building an op failed; the last 1 lines of its output:\nwarning: unused variable"
    print("streams restored")
    assert capfd.readouterr().out == "streams restored\n"


def test_deepspeed_says_which_ops_it_builds_and_where(tmp_path, monkeypatch, caplog, capfd):
    """Against an empty extensions cache (nothing is built here: the block is empty)."""
    import deepspeed.git_version_info

    from pretrain.parallel.deepspeed_engine import building_ops, ops_to_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(deepspeed.git_version_info, "installed_ops", {})  # as a pip install without prebuilt ops
    assert ops_to_build(offload_optimizer=True)["cpu_adam"] == tmp_path / "cpu_adam"
    assert "cpu_adam" not in ops_to_build(offload_optimizer=False)
    with caplog.at_level(logging.INFO):
        with building_ops(offload_optimizer=True):
            subprocess.run([sys.executable, "-c", WRITE_BOTH], check=True)
    (line,) = [m for m in caplog.messages if m.startswith("building DeepSpeed's CPU Adam")]
    assert "op" in line and "once (about a minute" in line and f"cached in {tmp_path / 'cpu_adam'}" in line
    assert "gcc" not in "".join(capfd.readouterr())

    (tmp_path / "cpu_adam" / "cpu_adam.so").touch()  # built: nothing to say
    assert "cpu_adam" not in ops_to_build(offload_optimizer=True)
