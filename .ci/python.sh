# Sourced by .ci/run and .ci/master: install the package with pip and set
# PY to the interpreter that has it.  On a Python that refuses pip installs
# (PEP 668 "externally-managed-environment": Debian's and Ubuntu's system
# Python) the package goes into a virtual environment in .venv instead,
# made with Debian's python3-venv when the venv module cannot make one.
# $1: what to install ('.' or '.[test]').
np_install() {
    local what="$1" out
    PY=python3
    if [ -x .venv/bin/python ]; then
        PY=.venv/bin/python
    fi
    if out=$("$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$what" 2>&1); then
        return 0
    fi
    if ! echo "$out" | grep -q "externally-managed-environment"; then
        echo "$out" | tail -n 5
        return 1
    fi
    echo "== this Python is externally managed: using a virtual environment in .venv"
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        local SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
        local ver
        ver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "python${ver}-venv" >/dev/null 2>&1 \
            || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3-venv >/dev/null 2>&1
        rm -rf .venv
        python3 -m venv .venv || { echo "could not make a virtual environment (install python3-venv)"; return 1; }
    fi
    PY=.venv/bin/python
    "$PY" -m pip install --quiet --disable-pip-version-check "$what"
}
