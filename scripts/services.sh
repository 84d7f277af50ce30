#!/usr/bin/env bash
# Start PostgreSQL and Redis on 127.0.0.1 if they are not already answering (tests use the real servers).
set -euo pipefail
PGHOST=127.0.0.1 PGPORT=${PGPORT:-5432}
if ! pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q .; then
    read -r ver name _ < <(pg_lsclusters -h | head -n1)
    pg_ctlcluster "$ver" "$name" start || true
  else
    command -v initdb >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    DATA=/tmp/hdm-pgdata
    if [ ! -d "$DATA" ]; then
      mkdir -p "$DATA" && chown postgres "$DATA"
      su postgres -c "$PGBIN/initdb -D $DATA -A trust -U postgres" >/dev/null
    fi
    su postgres -c "$PGBIN/pg_ctl -D $DATA -o '-h 127.0.0.1 -p $PGPORT' -l $DATA/log -w start" >/dev/null
  fi
  for _ in $(seq 30); do pg_isready -q -h "$PGHOST" -p "$PGPORT" && break; sleep 1; done
fi
if ! psql -h "$PGHOST" -p "$PGPORT" -U postgres -tAc "select 1 from pg_database where datname='test'" 2>/dev/null | grep -q 1; then
  psql -h "$PGHOST" -p "$PGPORT" -U postgres -c "create database test" >/dev/null 2>&1 || true
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
  redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
  for _ in $(seq 30); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
pg_isready -h "$PGHOST" -p "$PGPORT" >/dev/null && redis-cli ping >/dev/null && echo "services: postgresql and redis ready"
