# Sourced by the recipes here. lsoaa_python REPO prints the python to run: PYTHON when set, else the active
# virtual environment's, else the one `bash dev.sh setup` made (LSOAA_VENV, or REPO/.venv), else python3 from
# PATH: a recipe run from a fresh shell after `bash dev.sh main` finds the venv's torch without an activate.
lsoaa_python() {
    if [ -n "${PYTHON:-}" ]; then printf '%s\n' "$PYTHON"; return; fi
    local cand venv=${LSOAA_VENV:-}
    case $venv in  # relative to the repository, as for dev.sh (which runs from there)
        ""|/*) ;;
        *) venv=$1/$venv ;;
    esac
    for cand in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "${venv:+$venv/bin/python}" "$1/.venv/bin/python"; do
        if [ -n "$cand" ] && [ -x "$cand" ]; then printf '%s\n' "$cand"; return; fi
    done
    printf 'python3\n'
}
