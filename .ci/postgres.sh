# Sourced by .ci/run: a throwaway PostgreSQL server on loopback for the multi-worker tests.
# start_postgres installs the server from Debian's packages when missing, starts it in a temporary
# folder and exports OPTIMIZER_TEST_PG_URL; stop_postgres stops it and removes the folder.

PG_PORT="${PG_PORT:-55432}"
PG_DIR=""
PG_BIN=""

_as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || return 1
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || return 1
    fi
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    PG_DIR="$(mktemp -d /tmp/optimizer-pg.XXXXXX)"
    [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
    _as_postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U postgres >/dev/null || return 1
    _as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >/dev/null || return 1
    export OPTIMIZER_TEST_PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/postgres"
    echo "PostgreSQL running on 127.0.0.1:$PG_PORT for the tests"
}

stop_postgres() {
    if [ -n "$PG_DIR" ] && [ -d "$PG_DIR/data" ]; then
        _as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}
