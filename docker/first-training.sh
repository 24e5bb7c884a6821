#!/bin/sh
# docker-compose's trainer-init job: the stack's first training. It runs before any data may have reached
# the lake, so it retries until a run has produced a champion (the promotion gate refuses a model trained
# on too few rows), then exits 0 -- the API and the scheduled trainer wait for that exit.
set -u
retry_s=${FIRST_TRAINING_RETRY_S:-20}
while :; do
  if btc-anomaly train --by first-training; then
    if python - <<'PY'
from mlflow import MlflowClient

from btc_anomaly.config import get_settings

s = get_settings()
v = MlflowClient(s.mlflow_tracking_uri).get_model_version_by_alias(s.model_name, "champion")
print(f"champion: {s.model_name} version {v.version}")
PY
    then
      exit 0
    fi
    echo "first-training: no champion yet (too few rows in the lake?); retrying in ${retry_s}s"
  else
    echo "first-training: training failed (no data in the lake yet?); retrying in ${retry_s}s"
  fi
  sleep "$retry_s"
done
