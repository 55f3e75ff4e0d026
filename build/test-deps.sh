#!/usr/bin/env bash
# `make test`'s machine prerequisites besides Python: headless Chromium for the UI tests
# and a running PostgreSQL server (every storage test also runs on it). As root, install
# or start what is missing; otherwise say which command would, and go on: the tests that
# need it then fail with their own explanation. Nothing to do costs a few milliseconds.
set -u

as_root() { [ "$(id -u)" = 0 ]; }
tell() { echo "test-deps: $*" >&2; }

need_chromium() {
  if [ -n "${FLEETRUN_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1; then
    return
  fi
  if ! as_root; then
    tell "the UI tests need headless Chromium; as root, run: apt-get install -y chromium"
    return
  fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium ||
    tell "could not install chromium; the UI tests will fail"
}

need_postgres() {
  # Another server named by the tests' URL is the user's to run.
  [ -z "${FLEETRUN_TEST_POSTGRES_URL:-}" ] || return
  if ! command -v pg_isready >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    tell "no local PostgreSQL server is installed; the PostgreSQL tests will fail unless" \
      "FLEETRUN_TEST_POSTGRES_URL names a server they may use"
    return
  fi
  pg_isready -q -h 127.0.0.1 -p 5432 && return
  local start="pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main start"
  if ! as_root; then
    tell "the PostgreSQL tests need the local server; as root, run: $start"
    return
  fi
  $start || tell "could not start PostgreSQL; the PostgreSQL tests will fail"
  for _ in $(seq 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && return
    sleep 1
  done
  tell "PostgreSQL did not answer within 30 s; the PostgreSQL tests will fail"
}

need_chromium
need_postgres
exit 0
