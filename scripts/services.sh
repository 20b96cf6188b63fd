#!/usr/bin/env bash
# Local services that mqttsvc's tests and demo need: Mosquitto on
# 127.0.0.1:1883 (anonymous) and PostgreSQL on 127.0.0.1:5432, where user
# postgres connects over TCP without a password.
#
#   scripts/services.sh ensure
#
# Installs the Debian/Ubuntu packages when they are missing (as root; otherwise
# it prints the command to run), starts what is not running, and says nothing
# but one line when everything is already up.  It never stops or restarts a
# running service.
#
# Environment:
#   SERVICES_PG_TRUST=1  allow adding the loopback 'trust' rules for user
#                        postgres to an existing cluster that has databases.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO_DIR="$REPO/.demo"
MOSQUITTO_CONF=/etc/mosquitto/mosquitto.conf
PG_HBA_MARKER="# mqttsvc scripts/services.sh: local TCP as postgres without a password"

log() { printf 'services: %s\n' "$*"; }
die() { printf 'services: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# True when something accepts TCP connections on HOST PORT.
tcp_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# Poll CMD... every 0.25 s for at most SECONDS seconds.
wait_for() {
    local seconds=$1
    shift
    local tries=$((seconds * 4))
    while ! "$@"; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        sleep 0.25
    done
}

# Debian puts mosquitto in /usr/sbin, which is not on a normal user's PATH.
mosquitto_bin() {
    local found
    found="$(command -v mosquitto 2>/dev/null || true)"
    echo "${found:-/usr/sbin/mosquitto}"
}

have_mosquitto() { [ -x "$(mosquitto_bin)" ]; }

have_postgresql() {
    command -v pg_ctlcluster >/dev/null 2>&1 &&
        command -v pg_isready >/dev/null 2>&1 &&
        command -v psql >/dev/null 2>&1 &&
        compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

# --- installation -----------------------------------------------------------

INSTALLED_POSTGRESQL=0

install_missing() {
    local packages=()
    have_mosquitto || packages+=(mosquitto)
    have_postgresql || packages+=(postgresql)
    [ "${#packages[@]}" -gt 0 ] || return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        die "missing ${packages[*]}, and this is not a Debian/Ubuntu system: install" \
            "Mosquitto and a PostgreSQL server yourself, then run this again"
    fi
    if ! is_root; then
        die "missing ${packages[*]}; install with:" \
            "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y ${packages[*]}"
    fi
    log "installing ${packages[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
    have_mosquitto || die "mosquitto is still missing after apt-get install"
    have_postgresql || die "the PostgreSQL server is still missing after apt-get install"
    case " ${packages[*]} " in *" postgresql "*) INSTALLED_POSTGRESQL=1 ;; esac
}

# --- Mosquitto --------------------------------------------------------------

# The configuration lines of FILE and of the files its include_dir names,
# without comments.
mosquitto_conf_lines() {
    local file=$1 dir
    [ -r "$file" ] || return 0
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$file" | grep -v '^[[:space:]]*$' || true
    awk '$1 == "include_dir" {print $2}' "$file" | while read -r dir; do
        for f in "$dir"/*.conf; do
            [ -r "$f" ] && sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$f" | grep -v '^[[:space:]]*$'
        done
    done || true
}

# True when FILE makes Mosquitto accept anonymous clients on 127.0.0.1:1883.
mosquitto_conf_suits() {
    local lines
    lines="$(mosquitto_conf_lines "$1")"
    # Without any listener, Mosquitto 2 listens on localhost:1883 and accepts
    # anonymous clients there ("local only mode").
    if ! grep -Eq '^[[:space:]]*(listener|port)[[:space:]]' <<<"$lines"; then
        return 0
    fi
    grep -Eq '^[[:space:]]*(listener[[:space:]]+1883([[:space:]]+(127\.0\.0\.1|0\.0\.0\.0|localhost|::))?|port[[:space:]]+1883)[[:space:]]*$' <<<"$lines" &&
        grep -Eq '^[[:space:]]*allow_anonymous[[:space:]]+true' <<<"$lines"
}

# A private configuration under .demo/ for when the system one does not suit
# (or cannot be used without root); its path goes into DEMO_MOSQUITTO_CONF.
write_demo_mosquitto_conf() {
    mkdir -p "$DEMO_DIR"
    local conf="$DEMO_DIR/mosquitto.conf" logfile="$DEMO_DIR/mosquitto.log"
    DEMO_MOSQUITTO_CONF=$conf
    cat >"$conf" <<EOF
# Written by scripts/services.sh: anonymous clients on 127.0.0.1:1883.
listener 1883 127.0.0.1
allow_anonymous true
persistence false
log_dest file $logfile
EOF
    touch "$logfile"
    # As root, Mosquitto drops to user 'mosquitto' before it opens its log.
    if is_root && id mosquitto >/dev/null 2>&1; then
        chown mosquitto "$logfile"
    fi
}

ensure_mosquitto() {
    tcp_open 127.0.0.1 1883 && return 0
    local conf
    if is_root && mosquitto_conf_suits "$MOSQUITTO_CONF"; then
        conf=$MOSQUITTO_CONF
        # systemd's unit would create these; without systemd nobody has.
        local dir
        for dir in /run/mosquitto /var/log/mosquitto; do
            mkdir -p "$dir"
            id mosquitto >/dev/null 2>&1 && chown mosquitto "$dir"
        done
    else
        write_demo_mosquitto_conf
        conf=$DEMO_MOSQUITTO_CONF
    fi
    log "starting mosquitto with $conf"
    "$(mosquitto_bin)" -d -c "$conf"
    wait_for 10 tcp_open 127.0.0.1 1883 ||
        die "mosquitto did not start listening on 127.0.0.1:1883; see the log_dest of $conf"
}

# --- PostgreSQL -------------------------------------------------------------

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 -t 2; }

pg_trusts_postgres() {
    PGCONNECT_TIMEOUT=5 psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -XqtAc 'SELECT 1' \
        >/dev/null 2>&1
}

# "VERSION NAME OWNER" of the cluster configured for port 5432, if any.
pg_cluster_5432() {
    pg_lsclusters --no-header 2>/dev/null | awk '$3 == 5432 {print $1, $2, $5; exit}'
}

CREATED_CLUSTER=0

ensure_postgresql() {
    local version name owner
    if ! pg_ready; then
        read -r version name owner <<<"$(pg_cluster_5432)" || true
        if [ -z "${version:-}" ]; then
            if [ -n "$(pg_lsclusters --no-header 2>/dev/null)" ]; then
                die "no PostgreSQL cluster is configured for port 5432 (see pg_lsclusters);" \
                    "set port = 5432 in one of them, or create one with pg_createcluster"
            fi
            version="$(basename "$(compgen -G '/usr/lib/postgresql/*/bin/postgres' |
                sed 's|/bin/postgres$||' | sort -V | tail -n 1)")"
            is_root || die "there is no PostgreSQL cluster; create one with:" \
                "sudo pg_createcluster $version main"
            log "creating PostgreSQL $version cluster 'main'"
            pg_createcluster "$version" main >/dev/null
            name=main
            CREATED_CLUSTER=1
            read -r version name owner <<<"$(pg_cluster_5432)" || true
            [ -n "${version:-}" ] || die "the new cluster did not get port 5432 (see pg_lsclusters)"
        fi
        if ! is_root && [ "$(id -un)" != "$owner" ]; then
            die "PostgreSQL $version/$name is not running; start it with:" \
                "sudo pg_ctlcluster --skip-systemctl-redirect $version $name start"
        fi
        log "starting PostgreSQL $version/$name"
        pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
        wait_for 20 pg_ready ||
            die "PostgreSQL $version/$name does not accept connections on 127.0.0.1:5432;" \
                "see /var/log/postgresql/postgresql-$version-$name.log"
    fi
    pg_trusts_postgres && return 0
    allow_local_postgres "$(pg_cluster_5432)"
}

# True when the cluster holds no database besides the ones initdb makes.
pg_cluster_is_fresh() {
    local count
    count="$(runuser -u postgres -- psql -XqtAc \
        "SELECT count(*) FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')" \
        2>/dev/null)" || return 1
    [ "$count" = 0 ]
}

# The tests and the demo connect with 'host=127.0.0.1 user=postgres' and no
# password: put loopback 'trust' rules for that user ahead of the others.
allow_local_postgres() {
    local version name owner hba
    read -r version name owner <<<"$1" || true
    hba="/etc/postgresql/$version/$name/pg_hba.conf"
    local how="add these lines at the top of $hba, then run:
    pg_ctlcluster --skip-systemctl-redirect $version $name reload
  host all postgres 127.0.0.1/32 trust
  host all postgres ::1/128 trust"
    if [ -z "${version:-}" ] || ! is_root || [ ! -w "$hba" ]; then
        die "cannot connect to 127.0.0.1:5432 as user postgres without a password; as root," \
            "$how"
    fi
    if ! grep -qF "$PG_HBA_MARKER" "$hba"; then
        if [ "$INSTALLED_POSTGRESQL" != 1 ] && [ "$CREATED_CLUSTER" != 1 ] &&
            [ "${SERVICES_PG_TRUST:-}" != 1 ] && ! pg_cluster_is_fresh; then
            die "cannot connect to 127.0.0.1:5432 as user postgres without a password, and" \
                "this cluster already has databases, so it is left alone. Run again with" \
                "SERVICES_PG_TRUST=1 to let this script do it, or $how"
        fi
        log "letting user postgres connect over loopback TCP without a password ($hba)"
        local tmp
        tmp="$(mktemp)"
        {
            echo "$PG_HBA_MARKER"
            echo "host all postgres 127.0.0.1/32 trust"
            echo "host all postgres ::1/128 trust"
            cat "$hba"
        } >"$tmp"
        cat "$tmp" >"$hba" # keeps the file's owner and mode
        rm -f "$tmp"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload
    wait_for 10 pg_trusts_postgres ||
        die "user postgres still cannot connect to 127.0.0.1:5432 without a password; check $hba"
}

# --- main -------------------------------------------------------------------

ensure() {
    install_missing
    ensure_mosquitto
    ensure_postgresql
    log "mosquitto and postgresql are up"
}

case "${1:-}" in
    ensure) ensure ;;
    *)
        echo "usage: $0 ensure" >&2
        exit 2
        ;;
esac
