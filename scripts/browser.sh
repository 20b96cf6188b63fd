#!/usr/bin/env bash
# Headless Chromium and chromedriver for the status page's browser test
# (tests/test_status_page.py).
#
#   scripts/browser.sh ensure
#
# Installs Debian's chromium and chromium-driver packages when either is
# missing (as root; otherwise it prints the command to run and fails, so that
# `make test` never skips the browser test silently).  Set
# MQTTSVC_TEST_SKIP_BROWSER=1 to run the suite without a browser on purpose:
# the test is then reported as skipped.
set -euo pipefail

log() { printf 'browser: %s\n' "$*"; }
die() { printf 'browser: %s\n' "$*" >&2; exit 1; }

have_browser() {
    { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } &&
        command -v chromedriver >/dev/null 2>&1
}

ensure() {
    if have_browser; then
        log "chromium and chromedriver are installed"
        return 0
    fi
    if [ "${MQTTSVC_TEST_SKIP_BROWSER:-}" = 1 ]; then
        log "chromium or chromedriver missing; the browser test will be skipped (MQTTSVC_TEST_SKIP_BROWSER=1)"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        die "chromium and chromedriver are missing, and this is not a Debian/Ubuntu system:" \
            "install them yourself, or set MQTTSVC_TEST_SKIP_BROWSER=1 to skip the browser test"
    fi
    if [ "$(id -u)" -ne 0 ]; then
        die "chromium and chromedriver are missing; install with:" \
            "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver" \
            "(or set MQTTSVC_TEST_SKIP_BROWSER=1 to skip the browser test)"
    fi
    log "installing chromium and chromium-driver with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    have_browser || die "chromium or chromedriver is still missing after apt-get install"
}

case "${1:-}" in
    ensure) ensure ;;
    *)
        echo "usage: $0 ensure" >&2
        exit 2
        ;;
esac
