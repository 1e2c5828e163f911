#!/usr/bin/env bash
# Single-node launch through torchrun:
#   launch/torchrun.sh CONFIG [--section.key=value ...]
# Environment:
#   NPROC   processes on this node (default: one per visible GPU, 1 without GPUs)
#   PYTHON  interpreter with pretrain installed (default: .venv/bin/python if present, else python3)
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT for each process; more than one
# process needs a parallel.backend that shards across them.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC" -gt 0 ]] || NPROC=1
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pretrain train "$@"
