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

stop_fakes() {
  for name in sendgrid twilio; do
    if [ -f "var/fake-$name.pid" ]; then
      kill -TERM "$(cat "var/fake-$name.pid")" 2>/dev/null || true
      rm -f "var/fake-$name.pid"
    fi
  done
}

# Starts build/fake-NAME on a free port; prints the port.
start_fake() {
  local name=$1 port=""
  shift
  : > "var/fake-$name.log"
  nohup "build/fake-$name" --port 0 --ca "var/fake-$name.pem" "$@" \
    >>"var/fake-$name.log" 2>&1 &
  echo $! > "var/fake-$name.pid"
  for _ in $(seq 1 100); do
    port=$(sed -n 's/^listening port=\([0-9]*\).*/\1/p' "var/fake-$name.log")
    [ -n "$port" ] && break
    sleep 0.05
  done
  if [ -z "$port" ]; then
    echo "fake-$name did not start; see var/fake-$name.log" >&2
    exit 1
  fi
  echo "$port"
}

if [ "${1:-start}" = stop ]; then
  if running; then
    kill -TERM "$(cat "$pidfile")"
    for _ in $(seq 1 150); do running || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
  stop_fakes
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

  # The e-mail and SMS channels talk to local fakes of SendGrid and
  # Twilio, which speak the real APIs over TLS.
  stop_fakes
  sid=AC$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  twilio_token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  sendgrid_key=SG.$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  sg_port=$(start_fake sendgrid --api-key "$sendgrid_key")
  tw_port=$(start_fake twilio --account-sid "$sid" \
            --auth-token "$twilio_token" --callback-url \
            "http://127.0.0.1:8080/v1/callbacks/twilio")
  export FANOUT_SENDGRID_URL="https://127.0.0.1:$sg_port"
  export FANOUT_SENDGRID_API_KEY="$sendgrid_key"
  export FANOUT_SENDGRID_FROM="noreply@example.com"
  export FANOUT_SENDGRID_CA_FILE="var/fake-sendgrid.pem"
  export FANOUT_TWILIO_URL="https://127.0.0.1:$tw_port"
  export FANOUT_TWILIO_ACCOUNT_SID="$sid"
  export FANOUT_TWILIO_AUTH_TOKEN="$twilio_token"
  export FANOUT_TWILIO_FROM="+15005550006"
  export FANOUT_TWILIO_CA_FILE="var/fake-twilio.pem"
  export FANOUT_TWILIO_STATUS_CALLBACK_URL="http://127.0.0.1:8080/v1/callbacks/twilio"
  printf 'sendgrid=%s\ntwilio=%s\n' "$sg_port" "$tw_port" > var/fakes.ports
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
  admin API:    http://127.0.0.1:8080 (token in var/secrets.env), see docs/rest.md
  push, in-app: tail -f var/deliveries.jsonl (development sink)
  e-mail fake:  curl -sk https://127.0.0.1:$(sed -n 's/sendgrid=//p' var/fakes.ports)/_fake/accepted
  SMS fake:     curl -sk https://127.0.0.1:$(sed -n 's/twilio=//p' var/fakes.ports)/_fake/accepted
  send event:   kcat -P -b \$(cat var/kafka.bootstrap) -t notifications examples/event.json
  dead letters: kcat -C -b \$(cat var/kafka.bootstrap) -t notifications.dlq -J -e
  admin token:  var/secrets.env
  stop:         make stop
MSG
