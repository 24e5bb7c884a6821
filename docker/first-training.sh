#!/bin/sh
# The stack's first training: docker-compose's trainer-init job, and the Procfile's trainer before it
# starts `train --every`. It starts before any data may have reached the lake, so it waits until the
# transactions table holds the rows the promotion gate asks for, then trains until a run has produced a
# champion, and exits 0 -- the API and the scheduled trainer wait for that.
set -u
retry_s=${FIRST_TRAINING_RETRY_S:-20}
# A stop (docker's SIGTERM to PID 1, which a shell otherwise ignores; honcho's SIGTERM; Ctrl-C) goes to
# the running child, whose own handler ends its MLflow run, and the script exits 128 + signal.
child=0
stop() {
  if [ "$child" -ne 0 ]; then
    kill -s "$1" "$child" 2>/dev/null
    wait "$child"
  fi
  exit "$2"
}
trap 'stop TERM 143' TERM
trap 'stop INT 130' INT
# Runs "$@" in the background and waits, so the traps run while it works.
run() {
  "$@" &
  child=$!
  wait "$child"
  rc=$?
  child=0
  return "$rc"
}
# Rows in the table vs the gate's minimum; exit 0 when there are enough (prints the count either way).
enough_rows() {
  python - <<'PY'
import sys

from btc_anomaly.config import get_settings

s = get_settings()
table = s.model_train_table or s.lake_table("transactions")
try:
    from deltalake import DeltaTable

    rows = DeltaTable(str(table)).to_pyarrow_dataset().count_rows()
except Exception:
    rows = 0
print(f"first-training: {rows} rows in {table} (gate minimum {s.gate_min_train_rows})")
sys.exit(0 if rows >= s.gate_min_train_rows else 1)
PY
}
has_champion() {
  python - <<'PY'
import sys

from mlflow import MlflowClient

from btc_anomaly.config import get_settings

s = get_settings()
try:
    v = MlflowClient(s.mlflow_tracking_uri).get_model_version_by_alias(s.model_name, "champion")
except Exception as exc:  # not registered / no alias yet, or the registry not answering: retried
    print(f"first-training: no champion at {s.mlflow_tracking_uri} yet ({type(exc).__name__}: {exc})")
    sys.exit(1)
print(f"first-training: champion is {s.model_name} version {v.version}")
PY
}
while :; do
  if run enough_rows; then
    if run btc-anomaly train --by first-training && run has_champion; then
      exit 0
    fi
    echo "first-training: no champion yet; retrying in ${retry_s}s"
  fi
  run sleep "$retry_s"
done

