#!/usr/bin/env bash
# Create .venv and install mqttsvc into it (editable, with test and dev
# extras), then refresh Twisted's plugin cache so `twistd --help` lists
# mqttsvc.  On a fresh Debian/Ubuntu machine python3-venv may be missing:
# installed with apt when running as root, otherwise named.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "venv: $PYTHON not found; install it: apt-get install python3 python3-venv" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "venv: installing python3-venv with apt"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "venv: Python's venv module is missing; run: sudo apt-get install python3-venv" >&2
        exit 1
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The compat editable mode puts the checkout itself on sys.path, which is
# what Twisted's plugin scan needs to find twisted/plugins/mqttsvc_plugin.py.
"$VENV/bin/python" -m pip install --quiet -e '.[test,dev]' --config-settings editable_mode=compat
"$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
# Read the whole listing first: `grep -q` would close the pipe early and,
# with pipefail, fail on twistd's broken pipe.
listing=$("$VENV/bin/twistd" --help)
grep -q ' mqttsvc ' <<<"$listing" || {
    echo "venv: twistd does not list the mqttsvc plugin after install" >&2
    exit 1
}
