#!/usr/bin/env bash
# A local two-node Ray cluster with token authentication, for `ray job submit` and multi-node runs
# on one machine (Ray 2.60 requires RAY_AUTH_MODE=token and a token for job submission).
#
#   cluster/local.sh start    # head + one more worker node; prints the address to submit to
#   eval "$(cluster/local.sh env)"
#   ray job submit --working-dir . -- python jobs/trackstar.py runs/job/trackstar.yaml
#   cluster/local.sh stop
#
# Settings (environment): RAYATTR_LOCAL_PORT (GCS port, 6390), RAYATTR_LOCAL_DASHBOARD_PORT (8290),
# RAYATTR_LOCAL_CPUS (CPUs per node, 1), RAYATTR_LOCAL_DIR (state directory, /tmp/rayattr-local).
set -euo pipefail

port=${RAYATTR_LOCAL_PORT:-6390}
dashboard=${RAYATTR_LOCAL_DASHBOARD_PORT:-8290}
cpus=${RAYATTR_LOCAL_CPUS:-1}
dir=${RAYATTR_LOCAL_DIR:-/tmp/rayattr-local}
ray=${RAY:-ray}
export RAY_AUTH_MODE=token

# This cluster's processes: those whose command line names its state directory, and their
# children (dashboard agents and workers rename themselves, e.g. "ray::DashboardAgent").
cluster_pids() {
  local pids children
  pids=$(pgrep -f -- "$dir/session_" || true)
  children=$pids
  while [ -n "$children" ]; do
    children=$(for pid in $children; do pgrep -P "$pid" || true; done)
    pids="$pids $children"
  done
  echo $pids
}

fail() {
  echo "ray start failed (a short RAYATTR_LOCAL_DIR helps: Ray's socket paths are limited); last lines of $1:" >&2
  tail -n 5 "$1" >&2
  exit 1
}

env_lines() {
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_ADDRESS=http://127.0.0.1:${dashboard}"
}

case "${1:-}" in
  start)
    mkdir -p "$dir"
    "$ray" get-auth-token --generate > /dev/null
    # Each node's dashboard agent gets its own port: two nodes (and any other local Ray) share the host.
    "$ray" start --head --port "$port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" \
      --dashboard-agent-listen-port $((dashboard + 1)) --num-cpus "$cpus" --temp-dir "$dir" \
      --disable-usage-stats > "$dir/head.log" 2>&1 || fail "$dir/head.log"
    # A second raylet on the same host is a second node to Ray: actors can be spread over both.
    "$ray" start --address "127.0.0.1:${port}" --dashboard-agent-listen-port $((dashboard + 2)) \
      --num-cpus "$cpus" --resources '{"second_node": 1}' --temp-dir "$dir" \
      --disable-usage-stats > "$dir/worker.log" 2>&1 || fail "$dir/worker.log"
    # Ready when the job API answers (the dashboard starts a few seconds after `ray start`).
    for _ in $(seq 120); do
      if RAY_ADDRESS="http://127.0.0.1:${dashboard}" "$ray" job list > /dev/null 2>&1; then
        env_lines
        exit 0
      fi
      sleep 1
    done
    echo "the local Ray cluster's job API did not come up; see $dir/head.log and $dir/session_latest/logs" >&2
    exit 1
    ;;
  env)
    env_lines
    ;;
  stop)
    # Only this cluster's processes: `ray stop` would also stop any other Ray on the host.
    pids=$(cluster_pids)
    [ -n "$pids" ] || exit 0
    kill $pids 2> /dev/null || true
    for _ in $(seq 10); do
      pids=$(for pid in $pids; do kill -0 "$pid" 2> /dev/null && echo "$pid"; done)
      [ -n "$pids" ] || exit 0
      sleep 1
    done
    kill -9 $pids 2> /dev/null || true
    ;;
  *)
    echo "usage: $0 start|env|stop" >&2
    exit 2
    ;;
esac
