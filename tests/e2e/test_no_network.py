"""`pretrain train` needs no network (SECURITY.md): a real run with eval and checkpoints, and one
with wandb offline, succeed on a machine where every attempt to reach another host fails, and
make no such attempt. Python's socket functions are replaced in every process of the run (see
block_network.py); where `unshare -rn` works the run also gets a network namespace with only
loopback, so that code outside Python (wandb's service, gloo) cannot reach anything either."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_metrics, tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BLOCKER = Path(__file__).with_name("block_network.py")


@functools.cache
def network_namespace() -> list[str]:
    """A command prefix that runs its command without any network but loopback, or [] where
    user namespaces or `ip` are unavailable (the socket guard still runs there)."""
    prefix = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "netns"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else []


def offline_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """(environment whose Python processes load the guard, the file it records attempts in)."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copyfile(BLOCKER, site / "sitecustomize.py")
    attempts = tmp_path / "network_attempts.jsonl"
    # WANDB_* from the caller (WANDB_MODE=offline, say) could hide what the config alone does.
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), NO_NETWORK_LOG=str(attempts))
    return env, attempts


def recorded(attempts: Path) -> list[str]:
    """Each blocked attempt: call(target), the process and the stack that made it."""
    if not attempts.exists():
        return []
    records = [json.loads(line) for line in attempts.read_text().splitlines()]
    return [f"{r['call']}({r['target']}) in pid {r['pid']} from\n{''.join(r['stack'])}" for r in records]


def test_the_guard_blocks_and_records_remote_addresses_only(tmp_path):
    """Without this the other tests could pass with a guard that blocks nothing."""
    env, attempts = offline_env(tmp_path)
    probe = """
import errno, socket, urllib.request
for reach in (lambda: socket.create_connection(("192.0.2.1", 80), timeout=5),  # TEST-NET-1
              lambda: urllib.request.urlopen("http://example.com", timeout=5)):
    try:
        reach()
        raise SystemExit("reached the network")
    except OSError as exc:
        assert getattr(exc, "reason", exc).errno == errno.ENETUNREACH, exc  # urllib wraps it in URLError
server = socket.create_server(("127.0.0.1", 0))
socket.create_connection(server.getsockname(), timeout=5).close()  # loopback stays open
"""
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=60)
    assert [line.split(" in pid")[0] for line in recorded(attempts)] == [
        "create_connection(('192.0.2.1', 80))", "create_connection(('example.com', 80))"]


@pytest.mark.parametrize("wandb_mode", ["disabled", "offline"])
def test_training_makes_no_network_attempt(tmp_path, corpus_file, tokenizer_file, wandb_mode):
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(f"out_dir: {run}\n")
    args = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=3, eval__every=2,
                          checkpoint__every=2, logging__wandb__mode=wandb_mode)
    env, attempts = offline_env(tmp_path)
    result = subprocess.run([*network_namespace(), sys.executable, "-m", "pretrain", "train", str(config), *args],
                            cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert recorded(attempts) == [], "\n".join(recorded(attempts))
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3]
    assert {2, 3} <= {r["step"] for r in metrics if "val_loss" in r}
    assert json.loads((run / "checkpoints" / "step_00000003" / "manifest.json").read_text())["step"] == 3
    if wandb_mode == "offline":
        assert list((run / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
