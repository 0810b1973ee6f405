#!/usr/bin/env bash
# Starts the private services and fanoutd with the development
# configuration in the background, and says where to look.
#   scripts/run.sh        start (or say it is already running)
#   scripts/run.sh stop   stop fanoutd and the services
set -euo pipefail
cd "$(dirname "$0")/.."

pidfile=var/fanoutd.pid
logfile=var/fanoutd.log

running() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

if [ "${1:-start}" = stop ]; then
  if running; then
    kill -TERM "$(cat "$pidfile")"
    for _ in $(seq 1 150); do running || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
  scripts/services.sh stop
  exit 0
fi

mkdir -p var
scripts/services.sh start >/dev/null

# Development secrets, made once and kept private to this checkout.
if [ ! -f var/secrets.env ]; then
  umask 077
  {
    echo "FANOUT_ADMIN_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    echo "FANOUT_RELAY_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  } > var/secrets.env
fi

if running; then
  echo "fanoutd is already running (pid $(cat "$pidfile")); 'make stop' stops it."
else
  rm -f var/kafka.bootstrap
  set -a
  . var/services.env
  . var/secrets.env
  set +a
  nohup build/fanoutd -c examples/fanout.ini >>"$logfile" 2>&1 &
  echo $! > "$pidfile"
  for _ in $(seq 1 100); do
    [ -s var/kafka.bootstrap ] && break
    running || break
    sleep 0.1
  done
  if ! running || [ ! -s var/kafka.bootstrap ]; then
    echo "fanoutd did not start; the end of $logfile says why:" >&2
    tail -n 20 "$logfile" >&2
    exit 1
  fi
fi

bootstrap=$(cat var/kafka.bootstrap)
cat <<MSG
fanoutd is running (pid $(cat "$pidfile")) with the development config
examples/fanout.ini and its embedded Kafka broker at $bootstrap.

  log:          tail -f $logfile
  deliveries:   tail -f var/deliveries.jsonl
  send event:   kcat -P -b \$(cat var/kafka.bootstrap) -t notifications examples/event.json
  dead letters: kcat -C -b \$(cat var/kafka.bootstrap) -t notifications.dlq -J -e
  admin token:  var/secrets.env
  stop:         make stop
MSG
