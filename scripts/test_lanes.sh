#!/usr/bin/env bash
# `make test`: the whole suite as two pytest sessions running side by side ("lanes"), so the minutes the
# suite spends waiting (JVM and stack start-ups, health polls, Kafka round trips) overlap. Lane 1 runs the
# stack-level tiers (e2e, faults, the benchmark smoke runs), lane 2 integration + unit, each with its own
# session fixtures (one broker, one MLflow, one Spark session per lane). Lane 1's output is kept in a file
# and printed after lane 2's; the exit status is the worse of the two.
#
#   scripts/test_lanes.sh <venv bin> [pytest args...]      TEST_LANES=1: one session, in order (debugging)
set -uo pipefail
BIN=$1
shift
if [ "${TEST_LANES:-2}" = 1 ]; then
  exec "$BIN/pytest" "$@"
fi
LANE1=(tests/e2e tests/faults tests/bench)
LANE2=(tests/integration tests/unit)
# Files that run in the other lane than their tier, so the two lanes take about as long (`--durations`).
MOVED_TO_LANE2=(tests/faults/test_stream_crashes.py)
LANE2+=("${MOVED_TO_LANE2[@]}")
SKIP_IN_LANE1=("${MOVED_TO_LANE2[@]/#/--ignore=}")
# Every test directory is in one lane: a new tier must be added above, or it would silently not run.
for dir in tests/*/; do
  dir=${dir%/}
  case " ${LANE1[*]} ${LANE2[*]} " in *" $dir "*) ;; *)
    if compgen -G "$dir/test_*.py" >/dev/null; then echo "test_lanes.sh: $dir is in no lane" >&2; exit 2; fi ;;
  esac
done
log=$(mktemp "${TMPDIR:-/tmp}/btc-anomaly-lane1.XXXXXX.log")
# The cache plugin of one lane only: two sessions writing .pytest_cache at once would clobber it.
"$BIN/pytest" -p no:cacheprovider "${LANE1[@]}" "${SKIP_IN_LANE1[@]}" "$@" >"$log" 2>&1 &
lane1=$!
trap 'kill -INT "$lane1" 2>/dev/null; wait "$lane1"; exit 130' INT TERM
echo "test lanes: lane 1 (${LANE1[*]}) runs in the background, its output follows lane 2's (live: $log)"
"$BIN/pytest" "${LANE2[@]}" "$@"
rc2=$?
wait "$lane1"
rc1=$?
trap - INT TERM
echo
echo "================================ lane 1: ${LANE1[*]} (exit $rc1) ================================"
cat "$log"
rm -f "$log"
echo "test lanes: lane 1 exit $rc1, lane 2 exit $rc2"
[ "$rc1" = 0 ] && [ "$rc2" = 0 ]
