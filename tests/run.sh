#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Runs the cmocka test binaries of a build tree and sums their results:
# unit tests (BUILD_DIR/tests/test_*) then integration tests
# (BUILD_DIR/itests/itest_*). Each binary's output is shown as it runs and
# kept in BUILD_DIR/logs/NAME.log. The last line is "N passed, N failed";
# the exit status is non-zero when a test failed or none ran.
#
#   tests/run.sh BUILD_DIR [unit|integration|all] [NAME...]
#
# NAMEs restrict the run to those binaries. Environment:
#   FANOUT_TEST_TIMEOUT_UNIT         seconds per unit binary [60]
#   FANOUT_TEST_TIMEOUT_INTEGRATION  seconds per integration binary [300]

set -uo pipefail

usage() {
  echo "usage: tests/run.sh BUILD_DIR [unit|integration|all] [NAME...]" >&2
  exit 2
}

[ "$#" -ge 1 ] || usage
[ -d "$1" ] || { echo "run.sh: no build directory $1" >&2; exit 2; }
BUILD=$(cd "$1" && pwd -P)
KIND=${2:-all}
shift
[ "$#" -gt 0 ] && shift
case $KIND in
  unit | integration | all) ;;
  *) usage ;;
esac
ONLY=("$@")

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd -P)
LOGS=$BUILD/logs
mkdir -p "$LOGS" || exit 2

UNIT_TIMEOUT=${FANOUT_TEST_TIMEOUT_UNIT:-60}
ITEST_TIMEOUT=${FANOUT_TEST_TIMEOUT_INTEGRATION:-300}

export CMOCKA_MESSAGE_OUTPUT=stdout
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export FANOUT_TEST_BUILD=$BUILD

passed=0
failed=0
ran=0
bad=()
child=
viewer=

# The test and its viewer run in the background, where Ctrl-C and a
# signal sent to the runner do not reach them: pass the signal on so that
# no test outlives the runner.
on_signal() {
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null
  fi
  if [ -n "$viewer" ]; then
    kill -TERM "$viewer" 2>/dev/null
  fi
  echo "run.sh: interrupted" >&2
  exit 130
}
trap on_signal INT TERM

selected() {
  local n
  [ "${#ONLY[@]}" -eq 0 ] && return 0
  for n in "${ONLY[@]}"; do
    [ "$n" = "$1" ] && return 0
  done
  return 1
}

# Sums the numbers on cmocka's summary lines ("[  PASSED  ] 3 test(s)." and
# "[  FAILED  ] 1 test(s), listed below:"); a binary with several groups
# prints one summary per group.
count() {
  sed -n "s/^\[  $1  \] \([0-9][0-9]*\) test(s)[.,].*/\1/p" "$2" |
    awk '{ n += $1 } END { print n + 0 }'
}

# run_one BINARY TIMEOUT
run_one() {
  local bin=$1 secs=$2 name log rc p f start took note=
  name=$(basename "$bin")
  log=$LOGS/$name.log
  echo "== $name"
  : >"$log"
  start=$(date +%s.%N)
  # The binary writes to the log file rather than a pipe: a server it
  # starts and leaks would keep a pipe open and hang the run. tail shows
  # the log live and ends with the binary.
  timeout -k 10 "$secs" "$bin" >"$log" 2>&1 &
  child=$!
  tail -n +1 -s 0.2 -f --pid="$child" "$log" &
  viewer=$!
  wait "$child"
  rc=$?
  wait "$viewer"
  child=
  viewer=
  took=$(echo "$start $(date +%s.%N)" | awk '{ printf "%.1f", $2 - $1 }')
  p=$(count PASSED "$log")
  f=$(count FAILED "$log")
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    f=1
    case $rc in
      124 | 137) note=" (timed out after ${secs} s)" ;;
      *) note=" (exit status $rc)" ;;
    esac
  fi
  passed=$((passed + p))
  failed=$((failed + f))
  ran=$((ran + 1))
  if [ "$f" -gt 0 ]; then
    bad+=("$name$note")
  fi
  echo "-- $name: $p passed, $f failed in $took s$note"
}

# run_kind DIR PREFIX TIMEOUT
run_kind() {
  local bin
  for bin in "$BUILD/$1/$2"*; do
    if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
      continue
    fi
    selected "$(basename "$bin")" || continue
    run_one "$bin" "$3"
  done
}

if [ "$KIND" != integration ]; then
  run_kind tests test_ "$UNIT_TIMEOUT"
fi

if [ "$KIND" != unit ]; then
  if [ -r "$ROOT/var/services.env" ]; then
    set -a
    # shellcheck source=/dev/null
    . "$ROOT/var/services.env"
    set +a
  else
    echo "run.sh: no var/services.env; integration tests need" \
      "scripts/services.sh start" >&2
  fi
  run_kind itests itest_ "$ITEST_TIMEOUT"
fi

echo
if [ "${#bad[@]}" -gt 0 ]; then
  echo "Failed binaries (logs in ${LOGS#"$ROOT"/}):"
  printf '  %s\n' "${bad[@]}"
fi
if [ "$ran" -eq 0 ]; then
  echo "run.sh: no test binaries found under $BUILD" >&2
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ $((passed + failed)) -gt 0 ]
