#!/bin/bash
# Fault-tolerant torchrun recipe: when a worker dies, torchrun restarts the whole worker group (up to
# MAX_RESTARTS times) and train.py resumes from the newest checkpoint in CHECKPOINT_DIR, written every
# CHECKPOINT_EVERY steps. The resumed run ends bit-identical to one that never crashed.
#
#   ./torchrun_restarts.sh --optimizer soaa --steps 1000                  # one machine, NPROC_PER_NODE=2
#   ./torchrun_restarts.sh --optimizer soaa --steps 12 --fail-at-step 10  # try it: rank 1 dies once
#   NNODES=2 RDZV_ENDPOINT=host0:29400 CHECKPOINT_DIR=/shared/ckpt ./torchrun_restarts.sh --optimizer asgo
#
# Environment (optional): NPROC_PER_NODE (2), MAX_RESTARTS (3), CHECKPOINT_DIR (checkpoints),
# CHECKPOINT_EVERY (50), NNODES (1), RDZV_ENDPOINT (host:port of the c10d rendezvous; without it a
# standalone one on this machine), RUN_ID (lightning-soaa), PYTHON (the venv's; _python.sh). Arguments go to train.py.
# On several nodes CHECKPOINT_DIR must be shared storage: rank 0 writes, every rank reads.
set -euo pipefail

DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$DIR/_python.sh"
PYTHON=$(lsoaa_python "$(dirname "$DIR")")
args=(--nproc_per_node="${NPROC_PER_NODE:-2}" --max-restarts="${MAX_RESTARTS:-3}")
if [ -n "${RDZV_ENDPOINT:-}" ]; then
    # dynamic c10d rendezvous: every node's agent rejoins it after a failure
    args+=(--nnodes="${NNODES:-1}" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT"
           --rdzv-id="${RUN_ID:-lightning-soaa}")
else
    args+=(--standalone)
fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" "$DIR/train.py" \
    --checkpoint-dir "${CHECKPOINT_DIR:-checkpoints}" --checkpoint-every "${CHECKPOINT_EVERY:-50}" "$@"
