#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback, for the PostgreSQL store tests (CI's .ci/run and developers).
#
#   eval "$(bash scripts/pg_test_cluster.sh start)"   # prints: export DREAMROUTE_TEST_PG_URL=postgresql+psycopg://...
#   .venv/bin/python -m pytest tests/test_store_pg.py
#   bash scripts/pg_test_cluster.sh stop
#
# start  installs Debian's `postgresql` with apt-get where initdb is missing, creates a cluster in
#        $DREAMROUTE_PG_DIR (default /tmp/dreamroute-pg-$UID), listening on 127.0.0.1 on a free port
#        (no other interface; a unix socket inside the folder), with a superuser `dreamroute`
#        (password `dreamroute`, scram-sha-256) and a database `dreamroute`, and prints the export line
#        (also written to $DREAMROUTE_PG_DIR/url). As root the server runs as the `postgres` user
#        (initdb refuses root), or as a system user `dreamroute-pg` made for it where that is missing.
#        Durability is off (fsync, synchronous_commit): the data are thrown away. A cluster already
#        running in that folder is reused.
#        Opt-in, for routers on other hosts or network namespaces (benchmarks/federation.py):
#        $DREAMROUTE_PG_LISTEN  extra addresses to listen on besides 127.0.0.1 (comma-separated, e.g.
#                               10.77.0.1; each must exist on an interface when the server starts)
#        $DREAMROUTE_PG_HBA     address ranges allowed to log in with the password (scram-sha-256)
#                               besides loopback (comma- or space-separated CIDRs, e.g. 10.77.0.0/24)
#        The printed URL names 127.0.0.1 either way. Unset (CI, the tests): loopback only.
# stop   stops that cluster and deletes its folder (no error when none runs).
# Exit status: 0, or 1 with the reason on stderr (the server log is printed when it fails to start).
set -euo pipefail

DIR="${DREAMROUTE_PG_DIR:-/tmp/dreamroute-pg-$(id -u)}"
PGUSER_NAME="dreamroute"
PGPASS="dreamroute"

die() { echo "pg_test_cluster: $*" >&2; exit 1; }

bindir() {  # the folder holding initdb and pg_ctl (Debian keeps them in /usr/lib/postgresql/N/bin)
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    done
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"; return 0
    fi
    return 1
}

install_pg() {
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL (initdb, pg_ctl) is missing and there is no apt-get; install PostgreSQL 13 or newer"
    echo "pg_test_cluster: installing Debian's postgresql (initdb is missing)" >&2
    [ "$(id -u)" -eq 0 ] || die "installing postgresql needs root (sudo apt-get install -y postgresql)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

as_owner() {  # run a command as the cluster's owner (root cannot own a cluster)
    if [ "$(id -u)" -ne 0 ]; then "$@"; else runuser -u "$OWNER" -- "$@"; fi
}

pick_owner() {
    if [ "$(id -u)" -ne 0 ]; then OWNER="$(id -un)"; return; fi
    if id postgres >/dev/null 2>&1; then OWNER=postgres; return; fi
    id dreamroute-pg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin dreamroute-pg
    OWNER=dreamroute-pg
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local bin port url
    bin="$(bindir)" || { install_pg; bin="$(bindir)" || die "initdb not found after installing postgresql"; }
    pick_owner
    if [ -f "$DIR/url" ] && [ -f "$DIR/data/postmaster.pid" ] && as_owner "$bin/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
        echo "export DREAMROUTE_TEST_PG_URL=$(cat "$DIR/url")"; return 0
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR/sock"
    printf '%s\n' "$PGPASS" > "$DIR/pwfile"
    [ "$(id -u)" -ne 0 ] || chown -R "$OWNER" "$DIR"
    chmod 700 "$DIR"
    as_owner "$bin/initdb" -D "$DIR/data" -U "$PGUSER_NAME" --pwfile="$DIR/pwfile" --auth=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
        || as_owner "$bin/initdb" -D "$DIR/data" -U "$PGUSER_NAME" --pwfile="$DIR/pwfile" --auth=scram-sha-256 \
            -E UTF8 --no-locale >"$DIR/initdb.log" 2>&1 \
        || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
    port="$(free_port)"
    local listen="127.0.0.1" cidr
    if [ -n "${DREAMROUTE_PG_LISTEN:-}" ]; then
        listen="127.0.0.1,$(printf '%s' "$DREAMROUTE_PG_LISTEN" | tr -d ' ')"
    fi
    for cidr in $(printf '%s' "${DREAMROUTE_PG_HBA:-}" | tr ',' ' '); do
        printf 'host all all %s scram-sha-256\n' "$cidr" >> "$DIR/data/pg_hba.conf"
    done
    if ! as_owner "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start \
        -o "-c listen_addresses=$listen -p $port -k $DIR/sock -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >/dev/null; then
        cat "$DIR/server.log" >&2 || true
        die "the server did not start"
    fi
    PGPASSWORD="$PGPASS" "$bin/psql" -h 127.0.0.1 -p "$port" -U "$PGUSER_NAME" -d postgres -qAt \
        -c "CREATE DATABASE dreamroute" >/dev/null
    url="postgresql+psycopg://$PGUSER_NAME:$PGPASS@127.0.0.1:$port/dreamroute"
    printf '%s\n' "$url" > "$DIR/url"
    echo "export DREAMROUTE_TEST_PG_URL=$url"
}

stop() {
    local bin
    [ -d "$DIR/data" ] || { rm -rf "$DIR"; return 0; }
    bin="$(bindir)" || { rm -rf "$DIR"; return 0; }
    pick_owner
    as_owner "$bin/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop  (the folder: \$DREAMROUTE_PG_DIR, default /tmp/dreamroute-pg-\$UID)" ;;
esac
