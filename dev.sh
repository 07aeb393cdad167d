#!/usr/bin/env bash
# One entry point for people and CI. Everything it needs it installs itself, idempotently:
#   bash dev.sh main [args]   set up, then run the main job (training comparison on 2 CPU processes)
#   bash dev.sh test [args]   set up, then run the test suite (args go to pytest)
#   bash dev.sh setup         only set up
# Set LSOAA_VENV to use another virtual environment directory (default: .venv in the repo).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LSOAA_VENV:-.venv}"
PY="$VENV/bin/python"

log() { printf '[dev.sh] %s\n' "$*" >&2; }

setup_system() {
  # MPI and SLURM are real parts of the test suite (mpirun, a two-node SLURM cluster on this host).
  local need=()
  command -v mpirun >/dev/null || need+=(openmpi-bin libopenmpi-dev)
  command -v slurmctld >/dev/null || need+=(slurm-wlm)
  command -v munged >/dev/null || need+=(munge)
  if [ ${#need[@]} -eq 0 ]; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing system packages: ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    log "not root or no apt-get: ${need[*]} missing; the MPI/SLURM tests will be skipped"
  fi
}

setup_python() {
  local stamp="$VENV/.lightning-soaa-setup"
  local want
  want="$(sha256sum pyproject.toml | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$PY" ]; then return; fi
  log "creating $VENV"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # torch first, pinned, in its own command: anything that lets pip choose torch pulls a multi-GB CUDA build.
  "$PY" -m pip install -q "torch==2.13.0"
  DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[lightning,deepspeed,mpi,dev]"
  echo "$want" > "$stamp"
}

lint() {
  # Fails the run on any finding. mypy keeps its cache in .mypy_cache, so a rerun takes about a second.
  log "lint: ruff, mypy"
  "$PY" -m ruff check lightning_soaa deepspeed_ext tests benchmarks multinode_examples
  "$PY" -m mypy lightning_soaa
}

cmd="${1:-test}"
shift || true
case "$cmd" in
  setup)
    setup_system; setup_python ;;
  main)
    setup_python
    exec "$PY" -m lightning_soaa.lightning.main_job "$@" ;;
  test)
    setup_system; setup_python
    lint
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    exec "$PY" -m pytest -q -p no:cacheprovider "$@" ;;
  *)
    echo "usage: bash dev.sh {main|test|setup} [args]" >&2; exit 2 ;;
esac
