#!/usr/bin/env bash
# `make test`'s machine prerequisites besides Python: headless Chromium for the UI tests,
# a running PostgreSQL server (every storage test also runs on it), git, and Debian's docker.io
# (the Docker tests start a dockerd of their own: tests/dockerd.py). As root, install
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

need_git() {
  # The tests of git code locations make repositories and let agents fetch from them.
  command -v git >/dev/null 2>&1 && return
  if ! as_root; then
    tell "the git code location tests need git; as root, run: apt-get install -y git"
    return
  fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q git ||
    tell "could not install git; the git code location tests will fail"
}

TEST_DB_URL="postgresql://postgres@127.0.0.1:5432/test"

need_postgres() {
  # Another server named by the tests' URL is the user's to run.
  [ -z "${FLEETRUN_TEST_POSTGRES_URL:-}" ] || return
  if ! command -v pg_isready >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    if ! as_root; then
      tell "the PostgreSQL tests need a local server; as root, run: apt-get install -y" \
        "postgresql (or set FLEETRUN_TEST_POSTGRES_URL to a server they may use)"
      return
    fi
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql ||
      { tell "could not install postgresql; the PostgreSQL tests will fail"; return; }
  fi
  local version
  version="$(ls /etc/postgresql | sort -V | tail -1)"
  local start="pg_ctlcluster --skip-systemctl-redirect $version main start"
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if ! as_root; then
      tell "the PostgreSQL tests need the local server; as root, run: $start"
      return
    fi
    $start || tell "could not start PostgreSQL; the PostgreSQL tests will fail"
    for _ in $(seq 30); do
      pg_isready -q -h 127.0.0.1 -p 5432 && break
      sleep 1
    done
  fi
  PGCONNECT_TIMEOUT=10 psql -qAt "$TEST_DB_URL" -c "SELECT 1" >/dev/null 2>&1 && return
  if ! as_root; then
    tell "the PostgreSQL tests connect to $TEST_DB_URL without a password, which this" \
      "server refuses; as root, run make test once (it sets that up), or set" \
      "FLEETRUN_TEST_POSTGRES_URL"
    return
  fi
  # A fresh server: the tests' database, and passwordless access to it from loopback
  # only, for the postgres role only (a line of pg_hba.conf, said here).
  runuser -u postgres -- psql -qAt -c "SELECT 1 FROM pg_database WHERE datname = 'test'" |
    grep -q 1 || runuser -u postgres -- createdb test
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  local line="host test postgres 127.0.0.1/32 trust  # fleetrun tests (build/test-deps.sh)"
  if ! grep -qF "$line" "$hba"; then
    sed -i "1i $line" "$hba"
    tell "added to $hba: $line"
    runuser -u postgres -- psql -qAt -c "SELECT pg_reload_conf()" >/dev/null
  fi
  PGCONNECT_TIMEOUT=10 psql -qAt "$TEST_DB_URL" -c "SELECT 1" >/dev/null 2>&1 ||
    tell "cannot reach $TEST_DB_URL; the PostgreSQL tests will fail"
}

need_docker() {
  # Installed only: the tests start and stop a daemon of their own, with no bridge.
  command -v dockerd >/dev/null 2>&1 && command -v docker-init >/dev/null 2>&1 && return
  if ! as_root; then
    tell "the Docker tests need dockerd; as root, run: apt-get install -y docker.io"
    return
  fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io ||
    tell "could not install docker.io; the Docker tests will fail"
}

need_chromium
need_postgres
need_git
need_docker
exit 0
