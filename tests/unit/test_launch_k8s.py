"""launch/kubernetes.yaml: a PyTorchJob that Kubernetes would accept (checked against a JSON schema
of the fields it uses, tests/fixtures/pytorchjob.schema.yaml) and that runs `pretrain train`
through torchrun with a config and overrides that pretrain itself accepts."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from pretrain.config import load_config
from pretrain.resilience.run_lock import current_job_id

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "launch" / "kubernetes.yaml"
SCHEMA = REPO / "tests" / "fixtures" / "pytorchjob.schema.yaml"
MASTER_ADDR = "pretrain-master-0"  # what the training operator sets: <job name>-master-0
# The label the training operator puts on every pod of a job, valued with the job's name (JobNameLabel
# in kubeflow/training-operator's common types).
JOB_NAME_LABEL = "training.kubeflow.org/job-name"


def load_manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def schema_errors(manifest: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def replicas(manifest: dict) -> dict[str, dict]:
    return manifest["spec"]["pytorchReplicaSpecs"]


def trainer(manifest: dict, replica: str = "Master") -> dict:
    """The container the training operator configures (it must be named `pytorch`)."""
    return next(c for c in replicas(manifest)[replica]["template"]["spec"]["containers"] if c["name"] == "pytorch")


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def label_env(container: dict) -> dict[str, str]:
    """Each variable the container takes from a pod label through the downward API -> the label."""
    paths = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "") for e in container["env"]}
    return {name: label[1] for name, path in paths.items()
            if (label := re.fullmatch(r"metadata\.labels\['([^']+)'\]", path))}


def undeclared_mounts(manifest: dict) -> list[str]:
    """`replica/container/volume` for each volumeMount naming a volume its pod does not declare."""
    problems = []
    for name, spec in replicas(manifest).items():
        pod = spec["template"]["spec"]
        declared = {v["name"] for v in pod.get("volumes", [])}
        problems += [f"{name}/{c['name']}/{m['name']}" for c in pod["containers"]
                     for m in c.get("volumeMounts", []) if m["name"] not in declared]
    return problems


def volume_at(manifest: dict, path: str) -> dict:
    """The volume mounted at `path`, or the one holding it, in the Master pod."""
    pod = replicas(manifest)["Master"]["template"]["spec"]
    mounts = [m for m in trainer(manifest)["volumeMounts"]
              if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"nothing is mounted at {path}"
    return next(v for v in pod["volumes"] if v["name"] == max(mounts, key=lambda m: len(m["mountPath"]))["name"])


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(yaml.safe_load(SCHEMA.read_text()))


def test_manifest_matches_the_pytorchjob_schema():
    assert schema_errors(load_manifest()) == []


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


MISTAKES = {
    "typo in a replica spec": lambda m: _rename(replicas(m)["Worker"], "restartPolicy", "restartpolicy"),
    "typo in a container": lambda m: _rename(trainer(m), "volumeMounts", "volumeMount"),
    "typo in the spec": lambda m: _rename(m["spec"], "pytorchReplicaSpecs", "pytorchReplicaSpec"),
    "unknown replica type": lambda m: _rename(replicas(m), "Worker", "Workers"),
    "unquoted number in env": lambda m: next(e for e in trainer(m)["env"] if "value" in e).update(value=2),
    "unknown restart policy": lambda m: replicas(m)["Master"].update(restartPolicy="OnFail"),
    "volume with two sources": lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"][0]
    .update(emptyDir={}),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_schema_rejects_a_mistaken_manifest(mistake):
    manifest = copy.deepcopy(load_manifest())
    MISTAKES[mistake](manifest)
    assert schema_errors(manifest), f"the schema accepted a manifest with a {mistake}"


def test_the_schema_names_a_typod_key():
    manifest = copy.deepcopy(load_manifest())
    MISTAKES["typo in a container"](manifest)
    assert any("'volumeMount' was unexpected" in error for error in schema_errors(manifest))


def run_container_command(tmp_path: Path, labels: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(the arguments the pod's command passes to python, the pod's environment): bash runs the
    command and args as Kubernetes would, with the variables the training operator adds, the pod
    labels it sets (`labels`, default the job-name label; the downward API gives "" for a missing
    one) and a stand-in python that records its arguments."""
    manifest = load_manifest()
    container = trainer(manifest)
    labels = {JOB_NAME_LABEL: manifest["metadata"]["name"]} if labels is None else labels
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
    recorder, argv_file = tmp_path / "python", tmp_path / "argv"
    recorder.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$ARGV_FILE"\n')
    recorder.chmod(0o755)
    env = {**env_of(container), **{name: labels.get(label, "") for name, label in label_env(container).items()},
           "MASTER_ADDR": MASTER_ADDR, "MASTER_PORT": str(port)}
    subprocess.run([*container["command"], *container["args"]], check=True, timeout=60, capture_output=True,
                   env={**env, "PATH": os.environ["PATH"], "PYTHON": str(recorder), "ARGV_FILE": str(argv_file)})
    return argv_file.read_text().split("\0")[:-1], env


def test_the_pods_run_pretrain_train_through_torchrun(tmp_path):
    from torch.distributed.run import get_args_parser

    argv, env = run_container_command(tmp_path)
    assert argv[:2] == ["-m", "torch.distributed.run"], argv
    torchrun = get_args_parser().parse_args(argv[2:])
    assert torchrun.module and torchrun.training_script == "pretrain" and torchrun.training_script_args[0] == "train"
    assert torchrun.max_restarts == int(env["MAX_RESTARTS"]) > 0
    assert (torchrun.nnodes, torchrun.nproc_per_node) == (env["NNODES"], env["GPUS_PER_NODE"])
    assert torchrun.rdzv_backend == "c10d" and torchrun.rdzv_endpoint == f"{MASTER_ADDR}:{env['MASTER_PORT']}"
    assert torchrun.rdzv_id == env["PRETRAIN_JOB_ID"] == load_manifest()["metadata"]["name"]

    config_path, *overrides = torchrun.training_script_args[1:]
    assert [config_path, *overrides] == trainer(load_manifest())["args"]
    for override in overrides:
        assert re.fullmatch(r"--\w+(\.\w+)*=\S.*", override), f"{override!r} is not --section.key=value"
    # the image holds this repository at workingDir, so the config path is relative to the repo
    world_size = int(env["NNODES"]) * int(env["GPUS_PER_NODE"])
    config = load_config(str(REPO / config_path), overrides, world_size=world_size)
    assert config.checkpoint.resume and config.checkpoint.resume_from is None and config.checkpoint.every > 0
    assert "persistentVolumeClaim" in volume_at(load_manifest(), config.out_dir), "out_dir is not on the claim"


def test_every_pod_takes_the_out_dir_lock_job_id_from_the_job_name_label(tmp_path):
    """Two PyTorchJobs made from this file get different job ids, so neither takes over the other's
    out_dir lock, while a restarted pod keeps its job's id and takes over its own (run_lock.py)."""
    manifest = load_manifest()
    for name in replicas(manifest):
        assert label_env(trainer(manifest, name)).get("PRETRAIN_JOB_ID") == JOB_NAME_LABEL, name
    _, env = run_container_command(tmp_path)
    assert current_job_id(env) == f"PRETRAIN_JOB_ID={manifest['metadata']['name']}"
    # Without the label (an operator that does not set it) the pod stops and says so, rather than
    # sharing an empty job id with every other such job.
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_container_command(tmp_path, labels={})
    assert JOB_NAME_LABEL in failed.value.stderr.decode()


def test_node_and_gpu_counts_agree():
    manifest = load_manifest()
    env = env_of(trainer(manifest))
    assert replicas(manifest)["Master"]["replicas"] == 1
    assert int(env["NNODES"]) == sum(spec["replicas"] for spec in replicas(manifest).values())
    for name in replicas(manifest):
        container = trainer(manifest, name)
        assert int(env_of(container)["GPUS_PER_NODE"]) == int(container["resources"]["limits"]["nvidia.com/gpu"])


def test_failed_and_preempted_pods_restart():
    """OnFailure restarts a pod that exits with 75 after a preemption; ExitCode would not (it
    treats 1-127 as permanent), and the pod needs time to save its checkpoint after SIGTERM."""
    for spec in replicas(load_manifest()).values():
        assert spec["restartPolicy"] == "OnFailure"
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


def test_every_volume_mount_refers_to_a_declared_volume():
    manifest = load_manifest()
    assert undeclared_mounts(manifest) == []
    assert volume_at(manifest, "/dev/shm")["emptyDir"]["medium"] == "Memory"
    broken = copy.deepcopy(manifest)
    trainer(broken)["volumeMounts"].append({"name": "scratch", "mountPath": "/scratch"})
    assert undeclared_mounts(broken) == ["Master/pytorch/scratch", "Worker/pytorch/scratch"]  # one template


def test_nccl_defaults_match_the_slurm_script():
    slurm = (REPO / "launch" / "slurm.sbatch").read_text()
    defaults = dict(re.findall(r"export ((?:TORCH_)?NCCL_\w+|CUDA_\w+)=\$\{\1:-([^}]+)\}", slurm))
    assert defaults, "no NCCL defaults found in launch/slurm.sbatch"
    env = env_of(trainer(load_manifest()))
    assert {name: env.get(name) for name in defaults} == defaults
