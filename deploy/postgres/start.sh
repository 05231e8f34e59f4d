#!/bin/sh
# Initialise the data folder on first start (the password from POSTGRES_PASSWORD_FILE, e.g. a Swarm secret),
# then run Postgres in the foreground, reachable with that password only (scram-sha-256).
set -eu
: "${POSTGRES_USER:=workbench}" "${POSTGRES_DB:=workbench}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -r "${POSTGRES_PASSWORD_FILE:-}" ] || { echo "POSTGRES_PASSWORD_FILE must name a readable file" >&2; exit 1; }
    initdb --auth-local=peer --auth-host=scram-sha-256 --username=postgres --encoding=UTF8 --no-instructions \
        -D "$PGDATA" >/dev/null
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    # the password is read by psql itself: never on a command line that `ps` shows
    psql -v ON_ERROR_STOP=1 -q -d postgres --set=user="$POSTGRES_USER" --set=db="$POSTGRES_DB" <<'SQL'
\set password `cat "$POSTGRES_PASSWORD_FILE"`
CREATE ROLE :"user" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"user";
SQL
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
