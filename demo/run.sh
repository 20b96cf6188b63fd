#!/usr/bin/env bash
# The mqttsvc demo (`make demo`): the service on http://127.0.0.1:8780, three
# demo sites on the local Mosquitto, and a device simulator publishing to them,
# all writing into the PostgreSQL database mqttsvc_demo.  It runs until Ctrl-C,
# then stops the service and the simulator it started (and nothing else).
#
# Everything it writes goes under .demo/ (tokens, logs); the database is kept
# between runs.  Environment: DEMO_INTERVAL (seconds between simulator rounds,
# default 5).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

VENV=.venv
DEMO_DIR=.demo
DB=mqttsvc_demo
DSN="host=127.0.0.1 user=postgres dbname=$DB"
RPC_PORT=8780
RPC_URL="http://127.0.0.1:$RPC_PORT/rpc"
HEALTH_URL="http://127.0.0.1:$RPC_PORT/healthz"
STATUS_URL="http://127.0.0.1:$RPC_PORT/"
EVENTS_URL="http://127.0.0.1:$RPC_PORT/events"
TOKENS="$DEMO_DIR/tokens"
LOG="$DEMO_DIR/mqttsvc.log"
SIM_LOG="$DEMO_DIR/simulator.log"
SITES=(demo-north demo-south demo-east)
INTERVAL="${DEMO_INTERVAL:-5}"
MQTTSVC=("$VENV/bin/mqttsvc" --url "$RPC_URL" --token-file "$TOKENS")
PSQL=(psql -h 127.0.0.1 -U postgres -w -X)

say() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# --- cleanup: stop only what this script started ----------------------------

TWISTD_PID=""
SIM_PID=""
SLEEP_PID=""

stop_child() {
    local pid=$1 what=$2 tries=40
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    while alive "$pid" && [ "$tries" -gt 0 ]; do
        sleep 0.25
        tries=$((tries - 1))
    done
    if alive "$pid"; then
        say "$what (pid $pid) did not stop within 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if alive "$SLEEP_PID"; then kill "$SLEEP_PID" 2>/dev/null || true; fi
    if alive "$SIM_PID" || alive "$TWISTD_PID"; then
        say "stopping the simulator and mqttsvc"
    fi
    stop_child "$SIM_PID" simulator
    stop_child "$TWISTD_PID" mqttsvc
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- preconditions ----------------------------------------------------------

if [ ! -x "$VENV/bin/twistd" ] || [ ! -x "$VENV/bin/mqttsvc" ]; then
    die "no virtualenv with mqttsvc in $REPO/$VENV; run 'make' first"
fi

if tcp_open 127.0.0.1 "$RPC_PORT"; then
    holder=""
    if command -v ss >/dev/null 2>&1; then
        holder="$(ss -Hltnp "sport = :$RPC_PORT" 2>/dev/null | grep -o 'users:(.*)' | head -n 1)"
    fi
    die "port $RPC_PORT is already in use${holder:+ ($holder)}; is another mqttsvc or demo" \
        "running? Stop it, then run the demo again"
fi

scripts/services.sh ensure

# --- database and token -----------------------------------------------------

mkdir -p "$DEMO_DIR"
exists="$("${PSQL[@]}" -d postgres -qtAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")"
if [ "$exists" != 1 ]; then
    say "creating database $DB"
    "${PSQL[@]}" -d postgres -qc "CREATE DATABASE $DB" >/dev/null
fi

if [ ! -s "$TOKENS" ]; then
    say "writing a new token to $TOKENS"
    token="$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(16))')"
    (umask 077 && printf 'demo %s\n' "$token" >"$TOKENS")
fi
chmod 600 "$TOKENS" # mqttsvc refuses a token file that every user can read

# --- the service --------------------------------------------------------------

say "starting mqttsvc (log: $LOG)"
# Where this run's part of the (appended) log begins.
log_start=$(($( (wc -c <"$LOG") 2>/dev/null || echo 0) + 1))
"$VENV/bin/twistd" -n --pidfile= --logfile="$LOG" mqttsvc \
    --db "$DSN" \
    --rpc "tcp:$RPC_PORT:interface=127.0.0.1" \
    --rpc-token-file "$TOKENS" \
    --migrate \
    >"$DEMO_DIR/mqttsvc.out" 2>&1 &
TWISTD_PID=$!

healthy() {
    "$VENV/bin/python" - "$HEALTH_URL" <<'EOF' 2>/dev/null
import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
}

service_died() {
    printf 'demo: mqttsvc exited; its output:\n' >&2
    cat "$DEMO_DIR/mqttsvc.out" >&2 || true
    local recent
    recent="$(tail -c "+$log_start" "$LOG" 2>/dev/null | tail -n 20)"
    if [ -n "$recent" ]; then
        printf 'demo: the end of %s:\n%s\n' "$LOG" "$recent" >&2
    fi
    TWISTD_PID=""
    exit 1
}

for _ in $(seq 80); do
    alive "$TWISTD_PID" || service_died
    healthy && break
    sleep 0.25
done
healthy || die "mqttsvc did not answer $HEALTH_URL within 20 s; see $LOG"

for site in "${SITES[@]}"; do
    params="{\"site_id\": \"$site\", \"host\": \"127.0.0.1\", \"port\": 1883}"
    if error="$("${MQTTSVC[@]}" call site.create "$params" 2>&1 >/dev/null)"; then
        say "created site $site"
    elif [[ "$error" == *"already exists"* ]]; then
        say "site $site already exists"
    else
        die "cannot create site $site: $error"
    fi
done

# --- the simulator ------------------------------------------------------------

sites_csv="$(IFS=,; echo "${SITES[*]}")"
say "starting the simulator for $sites_csv every ${INTERVAL} s (log: $SIM_LOG)"
"$VENV/bin/python" demo/simulator.py --host 127.0.0.1 --port 1883 \
    --sites "$sites_csv" --interval "$INTERVAL" >"$SIM_LOG" 2>&1 &
SIM_PID=$!

# Exit status 0 when every demo site reports 'connected'; with -v, also
# prints one "site: status" line per demo site.
read -r -d '' SITES_PY <<'EOF' || true
import json
import sys

verbose = sys.argv[1] == "-v"
status = {s["site_id"]: s["status"] for s in json.load(sys.stdin)["items"]}
ok = True
for site in sys.argv[2:]:
    s = status.get(site, {"status": "missing"})
    ok = ok and s["status"] == "connected"
    if verbose:
        error = f" ({s['last_error']})" if s.get("last_error") else ""
        print(f"  {site}: {s['status']}{error}")
sys.exit(0 if ok else 1)
EOF

sites_connected() {
    "${MQTTSVC[@]}" call site.list '{"limit": 100}' 2>/dev/null | "$VENV/bin/python" -c "$SITES_PY" "$@"
}

connected=0
for _ in $(seq 60); do
    alive "$TWISTD_PID" || service_died
    alive "$SIM_PID" || die "the simulator exited: $(tail -n 3 "$SIM_LOG")"
    if sites_connected -q "${SITES[@]}"; then
        connected=1
        break
    fi
    sleep 0.5
done

echo
"${MQTTSVC[@]}" status || true
sites_connected -v "${SITES[@]}" || true
if [ "$connected" != 1 ]; then
    say "warning: not every demo site connected within 30 s; see $LOG"
fi

cat <<EOF

mqttsvc demo is running in $REPO (Ctrl-C stops it)
  status page: $STATUS_URL   (open it in a browser; paste the line of $TOKENS)
  JSON-RPC:   $RPC_URL   (bearer token in $TOKENS)
  events:     $EVENTS_URL   (Server-Sent Events, live)
  health:     $HEALTH_URL
  logs:       $LOG, $SIM_LOG

Try, from $REPO:
  $VENV/bin/mqttsvc --token-file $TOKENS status
  $VENV/bin/mqttsvc --token-file $TOKENS call site.list
  $VENV/bin/mqttsvc --token-file $TOKENS call site.status '{"site_id": "demo-north"}'
  curl -N -H "Authorization: Bearer \$(cut -d' ' -f2 $TOKENS)" $EVENTS_URL
  psql -h 127.0.0.1 -U postgres -d $DB -c 'SELECT site_id, gateway_id, status, last_seen_at FROM gateway ORDER BY 1, 2'
  tail -f $LOG

EOF

while true; do
    sleep 30 &
    SLEEP_PID=$!
    wait "$SLEEP_PID" || true
    SLEEP_PID=""
    alive "$TWISTD_PID" || service_died
    alive "$SIM_PID" || say "warning: the simulator has exited; see $SIM_LOG"
    echo "--- $(date '+%H:%M:%S')"
    "${MQTTSVC[@]}" status || true
done
