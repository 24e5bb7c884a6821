#!/usr/bin/env bash
# `make smoke-compose`: build docker-compose.yml's images and run the stack on this machine, then check it
# from inside the containers. No registry is needed: Debian's dockerd + docker-compose, a debian:bookworm-slim
# built with debootstrap, and docker-compose.smoke.yml's locally built stand-ins for Kafka, Postgres and
# Prometheus (Grafana is left out). The producer replays the bundled real sample.
#
# Passes when: the sample reaches the Delta lake, the first training registered a champion, the stream's
# scored rows reach GET /anomalies, POST /predict answers from the api container, the dashboard serves
# :8050 and Prometheus has every target up.
#
# State that makes the next run fast (dockerd's data root with the image layers, the debootstrap rootfs)
# lives in SMOKE_CACHE, outside the repository, so clean clones reuse it. Containers, volumes and the
# daemon are removed on exit, also on failure or Ctrl-C.
#
# Exit codes: 0 passed, 1 failed, 77 cannot run here (not root, no apt to install docker, dockerd does not
# start) -- tests/e2e/test_compose_smoke.py turns 77 into a skip.
set -euo pipefail

# Everything runs inside main(): bash then parses the whole script before running it, so editing the file
# during a run cannot change what the run executes.
main() {

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SMOKE_CACHE:-/var/cache/btc-anomaly-smoke}
PROJECT=${SMOKE_PROJECT:-btcsmoke}
STACK_TIMEOUT_S=${SMOKE_STACK_TIMEOUT_S:-900}  # from `up` to every check passing
# Services the smoke runs: all of docker-compose.yml but grafana and the `alerts` profile.
SERVICES=(kafka topic-init postgres mlflow producer stream trainer-init trainer detect api dashboard prometheus)
LONG_RUNNING=(kafka postgres mlflow producer stream trainer detect api dashboard prometheus)

t0=$(date +%s)
log() { printf '[smoke %s +%ss] %s\n' "$(date -u +%T)" "$(($(date +%s) - t0))" "$*" >&2; }
skip() { log "SKIP: $*"; exit 77; }

[ "$(id -u)" = 0 ] || skip "needs root (to run dockerd)"
mkdir -p "$CACHE"
# One smoke run at a time per cache: they would share dockerd's data root.
exec 9>"$CACHE/lock"
flock -w 1800 9 || { log "another smoke run holds $CACHE/lock"; exit 1; }

# --- 1. tools ---------------------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null || skip "docker.io, docker-compose and debootstrap are missing and there is no apt-get"
  log "installing docker.io docker-compose debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io docker-compose debootstrap
fi
# Debian's 20.10 client has BuildKit built in (a newer /usr/local/bin/docker may lack buildx).
export PATH=/usr/bin:/usr/sbin:$PATH

# --- 2. debian:bookworm-slim stand-in rootfs (cached) -------------------------------------------------------
# Bump ROOTFS_VERSION when the preparation below changes: the rootfs and the imported image are rebuilt.
ROOTFS_VERSION=2
if [ "$(cat "$CACHE/rootfs/.complete" 2>/dev/null)" != "$ROOTFS_VERSION" ]; then
  mirror=${MIRROR:-$(apt-cache policy 2>/dev/null | grep -oE 'https?://[^ ]+/debian' | head -1)}
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap bookworm from $mirror (once per cache)"
  rm -rf "$CACHE/rootfs" "$CACHE/rootfs.tmp"
  debootstrap --variant=minbase bookworm "$CACHE/rootfs.tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
  rm -f "$CACHE"/rootfs.tmp/var/cache/apt/archives/*.deb
  rm -rf "$CACHE"/rootfs.tmp/var/lib/apt/lists/*
  # Egress here may go through a TLS-re-signing proxy whose CA only the host's bundle has. Builds reach PyPI
  # and Maven Central through it, and installing Debian's ca-certificates (pulled in by python3-pip-whl,
  # Java) regenerates the bundle from /usr/local/share/ca-certificates: so every certificate of the host's
  # bundle goes there, one file each (Java's keystore is built from single-certificate files).
  cadir=$CACHE/rootfs.tmp/usr/local/share/ca-certificates
  mkdir -p "$cadir" "$CACHE/rootfs.tmp/etc/ssl/certs"
  awk -v dir="$cadir" '/BEGIN CERTIFICATE/ { n++; f = sprintf("%s/host-%03d.crt", dir, n) }
    f { print > f } /END CERTIFICATE/ { close(f); f = "" }' /etc/ssl/certs/ca-certificates.crt
  cp /etc/ssl/certs/ca-certificates.crt "$CACHE/rootfs.tmp/etc/ssl/certs/"
  echo "$ROOTFS_VERSION" >"$CACHE/rootfs.tmp/.complete"
  mv "$CACHE/rootfs.tmp" "$CACHE/rootfs"
fi

# --- 3. our own dockerd, all state under $CACHE --------------------------------------------------------------
SOCK=$CACHE/docker.sock
export DOCKER_HOST=unix://$SOCK
# A daemon left by a killed earlier run of this script (same data root): stop it first.
if [ -f "$CACHE/dockerd.pid" ] && kill -0 "$(cat "$CACHE/dockerd.pid")" 2>/dev/null \
   && grep -q -- "$CACHE/data" "/proc/$(cat "$CACHE/dockerd.pid")/cmdline" 2>/dev/null; then
  log "stopping a stale smoke dockerd ($(cat "$CACHE/dockerd.pid"))"
  kill -TERM "$(cat "$CACHE/dockerd.pid")"; sleep 5
fi
dockerd --data-root "$CACHE/data" --exec-root "$CACHE/exec" -H "unix://$SOCK" --pidfile "$CACHE/dockerd.pid" \
  >"$CACHE/dockerd.log" 2>&1 &
DPID=$!

ENV_FILE=$CACHE/smoke.env
DC=(docker-compose -p "$PROJECT" --env-file "$ENV_FILE" -f "$ROOT/docker-compose.yml" -f "$ROOT/docker-compose.smoke.yml")
passed=0
cleanup() {
  local rc=$?
  set +e
  if docker info >/dev/null 2>&1; then
    if [ "$passed" != 1 ] && [ -f "$ENV_FILE" ]; then
      log "FAILED (exit $rc): container states and log tails follow (full logs in $CACHE/last-logs.txt)"
      (cd "$ROOT" && "${DC[@]}" ps) >&2
      (cd "$ROOT" && "${DC[@]}" logs --no-color >"$CACHE/last-logs.txt" 2>&1)
      (cd "$ROOT" && "${DC[@]}" logs --no-color --tail 25) >&2
    fi
    [ -f "$ENV_FILE" ] && (cd "$ROOT" && "${DC[@]}" down -v --remove-orphans -t 20 >/dev/null 2>&1)
  fi
  kill -TERM "$DPID" 2>/dev/null
  for _ in $(seq 1 60); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$DPID" 2>/dev/null
  wait "$DPID" 2>/dev/null
  rm -f "$ENV_FILE"
  log "dockerd stopped, containers and volumes removed"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; kill -0 "$DPID" 2>/dev/null || break; sleep 0.5; done
docker info >/dev/null 2>&1 || { tail -20 "$CACHE/dockerd.log" >&2; skip "dockerd did not start (log: $CACHE/dockerd.log)"; }
log "dockerd up (data root $CACHE/data)"

# --- 4. base image ------------------------------------------------------------------------------------------
if [ "$(docker image inspect -f '{{index .Config.Labels "btc-anomaly.rootfs"}}' debian:bookworm-slim 2>/dev/null)" \
     != "$ROOTFS_VERSION" ]; then
  log "importing the debootstrap rootfs as debian:bookworm-slim"
  C=/etc/ssl/certs/ca-certificates.crt
  tar -C "$CACHE/rootfs" --exclude ./.complete -c . | docker import --change 'CMD ["/bin/bash"]' \
    --change "LABEL btc-anomaly.rootfs=$ROOTFS_VERSION" \
    --change "ENV SSL_CERT_FILE=$C PIP_CERT=$C REQUESTS_CA_BUNDLE=$C" - localhost/debian:bookworm >/dev/null
  docker tag localhost/debian:bookworm debian:bookworm
  docker tag localhost/debian:bookworm debian:bookworm-slim
fi

# --- 5. build and start ---------------------------------------------------------------------------------------
# Throwaway secrets; empty *_PORT = a random free host port (other stacks on this machine use the defaults).
cat >"$ENV_FILE" <<EOF
POSTGRES_PASSWORD=smoke$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
GF_SECURITY_ADMIN_PASSWORD=smoke$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
MLFLOW_ADMIN_PASSWORD=smoke$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
MLFLOW_FLASK_SERVER_SECRET_KEY=smoke$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
MLFLOW_PORT=
API_PORT=
DASHBOARD_PORT=
PROMETHEUS_PORT=
GRAFANA_PORT=
SPARK_DRIVER_MEMORY=1g
EOF
cd "$ROOT"
"${DC[@]}" config -q
# docker-compose.yml alone must be valid too, for compose v1 and (when installed) v2.
docker-compose --env-file "$ENV_FILE" -f docker-compose.yml config -q
if docker compose version >/dev/null 2>&1; then docker compose --env-file "$ENV_FILE" -f docker-compose.yml config -q; fi
log "building images"
tb=$(date +%s)
COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1 "${DC[@]}" build --parallel "${SERVICES[@]}" >"$CACHE/build.log" 2>&1 \
  || { tail -40 "$CACHE/build.log" >&2; log "build failed (log: $CACHE/build.log)"; exit 1; }
build_s=$(($(date +%s) - tb))
log "images built in ${build_s}s"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^btc-anomaly' | sort >&2
tu=$(date +%s)
# compose waits here for the one-shot jobs the api depends on (first training): bounded like the checks.
timeout "$STACK_TIMEOUT_S" "${DC[@]}" up -d "${SERVICES[@]}"

# --- 6. checks, from inside the containers ---------------------------------------------------------------------
cid() { "${DC[@]}" ps -q "$1"; }
deadline=$((tu + STACK_TIMEOUT_S))
last=""
while :; do
  now=$(date +%s)
  [ "$now" -lt "$deadline" ] || { log "timed out after ${STACK_TIMEOUT_S}s: $last"; exit 1; }
  state=""
  ti=$(cid trainer-init)
  if [ -n "$ti" ]; then
    read -r status code < <(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$ti")
    [ "$status" = exited ] && [ "$code" = 0 ] || state="trainer-init $status/$code"
  else
    state="trainer-init not created yet"
  fi
  for s in "${LONG_RUNNING[@]}"; do
    c=$(cid "$s")
    h=$([ -n "$c" ] && docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$c" || echo missing)
    [ "$h" = healthy ] || state="$state $s:$h"
  done
  if [ -z "$state" ]; then
    # Everything is up: the end-to-end checks (retried: Prometheus needs a scrape interval per target).
    if out=$(docker exec -i "$(cid api)" python - <"$ROOT/scripts/smoke_compose_checks.py" 2>&1) \
       && docker exec "$(cid dashboard)" python -c \
         "import urllib.request as u; r = u.urlopen('http://127.0.0.1:8050/', timeout=10); assert r.status == 200 and b'react-entry-point' in r.read()"; then
      printf '%s\n' "$out" >&2
      passed=1
      break
    fi
    state="checks: $(printf '%s' "$out" | tail -3 | tr '\n' ' ')"
  fi
  [ "$state" != "$last" ] && log "waiting: $state"
  last=$state
  sleep 5
done
stack_s=$(($(date +%s) - tu))
log "PASSED: total $(($(date +%s) - t0))s (build ${build_s}s, stack up to all checks green ${stack_s}s)"
}

main "$@"
