"""`pretrain train` needs no network (SECURITY.md): a real run with eval and checkpoints, and one
with wandb offline, succeed on a machine where every attempt to reach another host fails, and
make no such attempt; single-host runs (one process with a sharding backend, two under torchrun)
listen on loopback only. Python's socket functions are replaced in every process of the run (see
block_network.py), and the run's listening sockets, whoever opened them (gloo and torch's store
are C++), are read from /proc while it runs. Where user namespaces work, the run gets a network
namespace shaped like a cluster node: loopback plus an interface with a private address that
the hostname resolves to (which is what gloo binds by default), and no route anywhere else."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import read_metrics, tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BLOCKER = Path(__file__).with_name("block_network.py")


NODE_ADDRESS = "10.9.9.9"  # the simulated node's own network address


@pytest.fixture(scope="session")
def netns(tmp_path_factory) -> list[str]:
    return network_namespace(str(tmp_path_factory.mktemp("netns")))


def network_namespace(tmp_dir: str) -> list[str]:
    """A command prefix that runs its command in a network namespace like a cluster node's (see
    the module docstring), or with only loopback where veth pairs or bind mounts are refused, or
    [] where user namespaces or `ip` are unavailable (the socket guards still run there)."""
    hosts = Path(tmp_dir) / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{NODE_ADDRESS} {socket.gethostname()}\n")
    node = (f"ip link add v0 type veth peer name v1 && ip addr add {NODE_ADDRESS}/24 dev v0 && ip link set v0 up && "
            f"ip link set v1 up && mount --bind {hosts} /etc/hosts && ")
    for setup in (node, ""):
        prefix = ["unshare", "-rnm", "sh", "-c", f'ip link set lo up && {setup}exec "$@"', "netns"]
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            break
    return []


def _address(hex_address: str) -> str:
    """/proc/net/tcp's hex address (host byte order in 32-bit words, little-endian here)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def _descendants(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return found


def listening_sockets(root: int) -> set[tuple[str, str]]:
    """(process command line, address) of every TCP socket listening in `root`'s process tree
    right now."""
    listening = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{root}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            return set()
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = _address(fields[1].split(":")[0])
    found = set()
    for pid in _descendants(root):
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = target.removeprefix("socket:[").removesuffix("]")
            if inode in listening:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.add((command, listening[inode]))
    return found


def run_watching_listeners(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, set[tuple[str, str]]]:
    """Run `command` to the end, sampling its process tree's listening sockets every 50 ms."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    seen: set[tuple[str, str]] = set()
    with ThreadPoolExecutor(1) as pool:
        output = pool.submit(proc.communicate, timeout=300)
        while proc.poll() is None:
            seen |= listening_sockets(proc.pid)
            time.sleep(0.05)
        stdout, stderr = output.result()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), seen


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
for address in (("0.0.0.0", 0), ("192.0.2.1", 0)):  # every interface; another machine's address
    try:
        socket.create_server(address)
        raise SystemExit(f"listening on {address}")
    except OSError as exc:
        assert exc.errno == errno.EADDRNOTAVAIL, exc
server = socket.create_server(("127.0.0.1", 0))
socket.create_connection(server.getsockname(), timeout=5).close()  # loopback stays open
"""
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=60)
    assert [line.split(" in pid")[0] for line in recorded(attempts)] == [
        "create_connection(('192.0.2.1', 80))", "create_connection(('example.com', 80))", "bind(('0.0.0.0', 0))",
        "bind(('192.0.2.1', 0))"]


def test_the_listener_census_sees_sockets_opened_outside_python_guards(tmp_path, netns):
    """Without this the census could miss what it is meant to find. In the node-like namespace,
    gloo left to its defaults listens on the node's network address: what pretrain must avoid."""
    probe = ("import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); time.sleep(1.5)")
    result, listeners = run_watching_listeners([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr
    assert {address for _, address in listeners} == {"0.0.0.0"}
    if any("mount --bind" in part for part in netns):  # the node-like namespace could be made here
        gloo = ("import datetime, time, torch.distributed as dist; "
                "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1); time.sleep(1.5)")
        result, listeners = run_watching_listeners([*netns, sys.executable, "-c", gloo])
        assert result.returncode == 0, result.stderr
        assert {address for _, address in listeners} == {NODE_ADDRESS}


RUNS = {"wandb disabled": {"logging__wandb__mode": "disabled"},
        "wandb offline": {"logging__wandb__mode": "offline"},
        "fsdp, 1 process": {"parallel__backend": "fsdp"}}


@pytest.mark.parametrize("run_kind", list(RUNS))
def test_training_makes_no_network_attempt_and_listens_on_loopback_only(tmp_path, corpus_file, tokenizer_file,
                                                                          netns, run_kind):
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(f"out_dir: {run}\n")
    args = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=3, eval__every=2,
                          checkpoint__every=2, **RUNS[run_kind])
    env, attempts = offline_env(tmp_path)
    result, listeners = run_watching_listeners([*netns, sys.executable, "-m", "pretrain", "train", str(config), *args],
                                               cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert recorded(attempts) == [], "\n".join(recorded(attempts))
    assert all(ipaddress.ip_address(address).is_loopback for _, address in listeners), listeners
    if run_kind.startswith("fsdp"):
        assert listeners, "a process group was made: gloo listens (on loopback)"
    if run_kind == "wandb disabled":
        assert listeners == set(), "one process without a sharding backend opens no port"
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3]
    assert {2, 3} <= {r["step"] for r in metrics if "val_loss" in r}
    assert json.loads((run / "checkpoints" / "step_00000003" / "manifest.json").read_text())["step"] == 3
    if run_kind == "wandb offline":
        assert list((run / "wandb").glob("offline-run-*")), "wandb wrote no offline run"


def test_two_ranks_on_one_host_listen_on_loopback_only(tmp_path, corpus_file, tokenizer_file, netns):
    """torchrun's own rendezvous store (in the torchrun process) listens on every interface: torch's
    TCPStore has no bind address (SECURITY.md says so); the ranks' own sockets stay on loopback."""
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(f"out_dir: {run}\n")
    args = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=2, parallel__backend="fsdp",
                          train__micro_batch_size=2, train__global_batch_sequences=8)
    env, attempts = offline_env(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result, listeners = run_watching_listeners([*netns, *torchrun, "-m", "pretrain", "train", str(config), *args],
                                               cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert recorded(attempts) == [], "\n".join(recorded(attempts))
    ranks = {(command, address) for command, address in listeners if "torch.distributed.run" not in command}
    assert ranks and all(ipaddress.ip_address(address).is_loopback for _, address in ranks), listeners
    assert max(r["step"] for r in read_metrics(run) if "loss" in r) == 2
