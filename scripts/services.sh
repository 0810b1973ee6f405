#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Starts and stops the private PostgreSQL and Redis that development and the
# integration tests use. Both live under var/ in the repository, listen on
# loopback ports of their own and never touch a system-wide service, so a
# machine can run them next to its own databases and next to other clones.
# The chosen ports are written to var/services.env as fanout's config
# override variables, which tests/run.sh and developers source.
#
#   scripts/services.sh start|stop|status|env

set -euo pipefail
umask 022

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)
VAR=$ROOT/var
ENV_FILE=$VAR/services.env
PG_DIR=$VAR/pg
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/log
PG_SOCK=$PG_DIR/run
REDIS_DIR=$VAR/redis
REDIS_PIDFILE=$REDIS_DIR/redis.pid
REDIS_LOG=$REDIS_DIR/redis.log
REDIS_PORTFILE=$REDIS_DIR/port

PG_DEFAULT_PORT=${SERVICES_PG_PORT:-55432}
REDIS_DEFAULT_PORT=${SERVICES_REDIS_PORT:-56379}
# Seconds to wait for a server to answer, or to go away.
WAIT=${SERVICES_WAIT:-30}

say() { echo "services.sh: $*" >&2; }
die() { say "$*"; exit 1; }

log_tail() {
  if [ -r "$1" ]; then
    say "last lines of ${1#"$ROOT"/}:"
    tail -n 20 "$1" >&2
  fi
}

usage() {
  echo "usage: scripts/services.sh start|stop|status|env" >&2
  exit 2
}

# --- PostgreSQL --------------------------------------------------------

# The data directory remembers the major version that created it; prefer
# that one, else the newest installed.
pg_find_bin() {
  local ver d
  if [ -n "${PG_BINDIR:-}" ]; then
    PG_BIN=$PG_BINDIR
    return
  fi
  ver=$(cat "$PG_DATA/PG_VERSION" 2>/dev/null || true)
  if [ -n "$ver" ] && [ -x "/usr/lib/postgresql/$ver/bin/pg_ctl" ]; then
    PG_BIN=/usr/lib/postgresql/$ver/bin
    return
  fi
  PG_BIN=
  for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V); do
    if [ -x "$d/pg_ctl" ]; then
      PG_BIN=$d
    fi
  done
  if [ -z "$PG_BIN" ] && command -v pg_ctl >/dev/null 2>&1; then
    PG_BIN=$(dirname "$(command -v pg_ctl)")
  fi
  if [ -z "$PG_BIN" ]; then
    die "no PostgreSQL server binaries found; run scripts/deps.sh"
  fi
}

# PostgreSQL refuses to run as root. As root, run it as the owner of var/pg
# when that is an ordinary account, else as `postgres`, and give var/pg to
# that account; as anyone else, run it as ourselves.
pg_find_user() {
  PG_AS=()
  PG_USER=
  if [ "$(id -u)" -ne 0 ]; then
    if [ -e "$PG_DIR" ] && [ ! -O "$PG_DIR" ]; then
      die "var/pg belongs to $(stat -c %U "$PG_DIR"); use that account" \
        "(or root), or remove var/pg"
    fi
    return
  fi
  if [ -d "$PG_DIR" ] && [ "$(stat -c %u "$PG_DIR")" -ne 0 ]; then
    PG_USER=$(stat -c %U "$PG_DIR")
  else
    PG_USER=postgres
  fi
  if ! getent passwd "$PG_USER" >/dev/null; then
    die "no '$PG_USER' account to run PostgreSQL as; run scripts/deps.sh"
  fi
  PG_AS=(runuser -u "$PG_USER" --)
}

as_pg() {
  "${PG_AS[@]}" "$@"
}

pg_pid() {
  sed -n 1p "$PG_DATA/postmaster.pid" 2>/dev/null || true
}

pg_port() {
  sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null || true
}

# Running means: the postmaster in our pid file is alive and answers on the
# port it recorded.
pg_running() {
  local pid port
  pid=$(pg_pid)
  port=$(pg_port)
  [ -n "$pid" ] && [ -n "$port" ] || return 1
  pid_alive "$pid" || return 1
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U fanout -t 5
}

# Initialises into a side directory and renames it, so that an interrupted
# initdb never leaves a half-made data directory behind.
pg_init() {
  say "creating PostgreSQL cluster in var/pg/data"
  as_pg rm -rf "$PG_DATA.new"
  if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA.new" -A trust -U fanout \
      -E UTF8 --locale=C >"$PG_DIR/initdb.log" 2>&1; then
    log_tail "$PG_DIR/initdb.log"
    die "initdb failed"
  fi
  as_pg mv "$PG_DATA.new" "$PG_DATA"
}

pg_prepare() {
  mkdir -p "$PG_DIR"
  if [ -n "$PG_USER" ]; then
    if [ "$(stat -c %U "$PG_DIR")" != "$PG_USER" ]; then
      chown "$PG_USER:" "$PG_DIR"
    fi
    if ! as_pg test -w "$PG_DIR"; then
      die "user $PG_USER cannot write $PG_DIR: every directory above it" \
        "must be searchable by that user (chmod o+x), or run as a" \
        "normal user"
    fi
  fi
  as_pg mkdir -p "$PG_SOCK"
}

pg_ensure_db() {
  local port=$1 have
  have=$("$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U fanout \
    -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'fanout'")
  if [ "$have" != 1 ]; then
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U fanout fanout
  fi
}

pg_start() {
  local port sock opts
  if pg_running; then
    PG_PORT=$(pg_port)
    pg_ensure_db "$PG_PORT"
    return
  fi
  pg_prepare
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    pg_init
  fi
  port=$(pick_port "$PG_DEFAULT_PORT")
  # A Unix socket path has a short length limit (107 bytes); a deep clone
  # goes without one, since every client here connects over TCP.
  sock=$PG_SOCK
  if [ "${#sock}" -gt 90 ]; then
    sock=
  fi
  opts="-p $port -c listen_addresses=127.0.0.1"
  opts="$opts -k '$sock'"
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$WAIT" \
      -o "$opts" start >/dev/null 9>&-; then
    log_tail "$PG_LOG"
    die "PostgreSQL did not start on 127.0.0.1:$port"
  fi
  if ! wait_for "$WAIT" pg_running; then
    log_tail "$PG_LOG"
    die "PostgreSQL does not answer on 127.0.0.1:$port"
  fi
  PG_PORT=$port
  pg_ensure_db "$PG_PORT"
  say "PostgreSQL running on 127.0.0.1:$PG_PORT"
}

pg_stop() {
  local pid
  pid=$(pg_pid)
  if [ -z "$pid" ] || ! pid_alive "$pid"; then
    return 0
  fi
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t "$WAIT" \
      stop >/dev/null; then
    log_tail "$PG_LOG"
    die "PostgreSQL (pid $pid) did not stop"
  fi
  say "PostgreSQL stopped"
}

# --- Redis -------------------------------------------------------------

redis_pid() {
  cat "$REDIS_PIDFILE" 2>/dev/null || true
}

redis_port() {
  cat "$REDIS_PORTFILE" 2>/dev/null || true
}

# The pid file may be stale and its pid reused by something else.
redis_alive() {
  local pid comm
  pid=$(redis_pid)
  [ -n "$pid" ] && pid_alive "$pid" || return 1
  if [ -r "/proc/$pid/comm" ]; then
    comm=$(cat "/proc/$pid/comm")
    [ "${comm#redis}" != "$comm" ] || return 1
  fi
}

redis_ping() {
  [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]
}

redis_running() {
  local port
  port=$(redis_port)
  [ -n "$port" ] && redis_alive && redis_ping "$port"
}

# Redis forks before it binds, so a failed start shows only in its log:
# poll until it answers, or until the log written since LOG_START says it
# gave up.
redis_up_or_failed() {
  if redis_running; then
    return 0
  fi
  if tail -c "+$((LOG_START + 1))" "$REDIS_LOG" 2>/dev/null |
      grep -q -E 'aborting|Fatal|FATAL'; then
    REDIS_FAILED=1
    return 0
  fi
  return 1
}

redis_start() {
  local port
  if redis_running; then
    REDIS_PORT=$(redis_port)
    return
  fi
  command -v redis-server >/dev/null 2>&1 ||
    die "redis-server not found; run scripts/deps.sh"
  mkdir -p "$REDIS_DIR"
  rm -f "$REDIS_PIDFILE"
  port=$(pick_port "$REDIS_DEFAULT_PORT")
  echo "$port" >"$REDIS_PORTFILE"
  LOG_START=$(stat -c %s "$REDIS_LOG" 2>/dev/null || echo 0)
  REDIS_FAILED=0
  if ! redis-server --port "$port" --bind 127.0.0.1 --dir "$REDIS_DIR" \
      --daemonize yes --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_LOG" \
      --save "" --appendonly no >/dev/null 9>&-; then
    log_tail "$REDIS_LOG"
    die "redis-server did not start on 127.0.0.1:$port"
  fi
  if ! wait_for "$WAIT" redis_up_or_failed || [ "$REDIS_FAILED" -eq 1 ]; then
    log_tail "$REDIS_LOG"
    die "Redis does not answer on 127.0.0.1:$port"
  fi
  REDIS_PORT=$port
  say "Redis running on 127.0.0.1:$REDIS_PORT"
}

redis_stop() {
  local pid port
  if ! redis_alive; then
    rm -f "$REDIS_PIDFILE"
    return 0
  fi
  pid=$(redis_pid)
  port=$(redis_port)
  if [ -n "$port" ]; then
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" shutdown nosave \
      >/dev/null 2>&1 || true
  fi
  if ! wait_for 5 pid_gone "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
  fi
  if ! wait_for "$WAIT" pid_gone "$pid"; then
    log_tail "$REDIS_LOG"
    die "Redis (pid $pid) did not stop"
  fi
  rm -f "$REDIS_PIDFILE"
  say "Redis stopped"
}

# --- shared ------------------------------------------------------------

# A zombie still answers kill -0; where nothing reaps orphans promptly
# (containers whose init does not) it would look alive for a while.
pid_alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state=$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
  [ "$state" != Z ]
}

pid_gone() {
  ! pid_alive "$1"
}

# wait_for SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local secs=$1 deadline
  shift
  deadline=$((SECONDS + secs))
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      return 1
    fi
    sleep 0.05
  done
}

port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Starts from the preferred port and walks up past ports in use.
pick_port() {
  local port=$1 last=$(($1 + 200))
  while [ "$port" -le "$last" ] && [ "$port" -le 65535 ]; do
    if ! port_busy "$port"; then
      echo "$port"
      return
    fi
    port=$((port + 1))
  done
  die "no free port in $1..$last on 127.0.0.1"
}

write_env() {
  local tmp=$ENV_FILE.new
  {
    echo "# Written by scripts/services.sh start."
    echo "FANOUT_POSTGRES_DSN=postgresql://fanout@127.0.0.1:$PG_PORT/fanout"
    echo "FANOUT_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
  } >"$tmp"
  mv "$tmp" "$ENV_FILE"
}

# Two starts at once (two terminals, make -j) would pick the same ports.
# The servers must not inherit the lock's descriptor (9), or they would
# hold the lock for as long as they run.
lock() {
  mkdir -p "$VAR"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$VAR/.services.lock"
    flock -w "$WAIT" 9 || die "var/ is locked by another services.sh"
  fi
}

cmd_start() {
  lock
  pg_find_user
  pg_find_bin
  pg_start
  redis_start
  write_env
  cat "$ENV_FILE"
}

cmd_stop() {
  lock
  if [ -d "$PG_DATA" ]; then
    pg_find_user
    pg_find_bin
    pg_stop
  fi
  redis_stop
}

cmd_status() {
  local rc=0
  if [ -d "$PG_DATA" ]; then
    pg_find_user
    pg_find_bin
  fi
  if [ -d "$PG_DATA" ] && pg_running; then
    echo "postgres: running on 127.0.0.1:$(pg_port) (pid $(pg_pid))," \
      "data in var/pg/data"
  else
    echo "postgres: stopped"
    rc=3
  fi
  if redis_running; then
    echo "redis: running on 127.0.0.1:$(redis_port) (pid $(redis_pid))"
  else
    echo "redis: stopped"
    rc=3
  fi
  return "$rc"
}

cmd_env() {
  if [ ! -r "$ENV_FILE" ]; then
    die "no var/services.env yet; run scripts/services.sh start"
  fi
  cat "$ENV_FILE"
}

[ "$#" -eq 1 ] || usage
case $1 in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) usage ;;
esac
