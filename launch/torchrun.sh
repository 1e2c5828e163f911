#!/usr/bin/env bash
# Single-node launch through torchrun:
#   launch/torchrun.sh CONFIG [--section.key=value ...]
# e.g. launch/torchrun.sh configs/demo.yaml --parallel.backend=fsdp
#      launch/torchrun.sh configs/demo.yaml --parallel.backend=deepspeed --parallel.zero_stage=3
# Environment:
#   NPROC   processes on this node (default: one per visible GPU, 2 on a machine without GPUs)
#   PYTHON  interpreter with pretrain installed (default: .venv/bin/python if present, else python3)
#   MAX_RESTARTS  times torchrun restarts all processes after one fails (default 3); each restart
#           resumes from the newest complete checkpoint in out_dir, so a crash costs at most one
#           checkpoint interval. 0 = fail the job at the first crash. An invalid config fails at
#           once, before any process starts.
#   SHUTDOWN_TIMEOUT  seconds the ranks get to finish a step and save after Ctrl-C (default 600);
#           a second Ctrl-C stops them at once.
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT for each process. DeepSpeed runs
# under torchrun too (no `deepspeed` launcher needed). More than one process needs a
# parallel.backend that spreads over them (ddp, fsdp or deepspeed).
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC" -gt 0 ]] || NPROC=2
fi
if [[ "$NPROC" -gt 1 ]]; then
  # Each process gets an equal share of the cores for its intra-op threads (torchrun would set 1).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
fi

# pretrain.torchrun is torchrun that validates the config first (an invalid one fails once, not
# MAX_RESTARTS times) and ends quietly on Ctrl-C. SHUTDOWN_TIMEOUT: seconds the ranks get to save a
# checkpoint after Ctrl-C before torchrun kills them (torchrun's default, 30, cuts big saves short).
exec "$PYTHON" -m pretrain.torchrun --standalone --nproc_per_node "$NPROC" --max-restarts "${MAX_RESTARTS:-3}" \
  --shutdown_timeout "${SHUTDOWN_TIMEOUT:-600}" -m pretrain train "$@"
