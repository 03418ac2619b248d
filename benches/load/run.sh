#!/usr/bin/env bash
# End-to-end ingest throughput: wrk drives POST /api/v1/voice/llm against the release daemon
# (file:// upstream) with fsync=always at 1, 8 and 64 connections, then fsync=never at 64.
# Needs wrk (apt-get install wrk). Load and daemon share this machine's cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
work=$(mktemp -d -p "$PWD/target")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
run() { # fsync connections
  local fsync=$1 conns=$2 port=$((17000 + RANDOM % 1000))
  rm -rf "$work/spool"; mkdir -p "$work/spool"
  cat > "$work/cfg.toml" <<CFG
[server]
listen = "127.0.0.1:$port"
[spool]
dir = "$work/spool"
fsync = "$fsync"
max_bytes = "4GiB"
[upstream]
url = "file://$work/outbox"
batch_max_events = 2000
[log]
format = "json"
CFG
  VOICETAGD_LOG=warn ./target/release/voicetagd run --config "$work/cfg.toml" 2>"$work/log" &
  local pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.05; done
  curl -sf "127.0.0.1:$port/api/v1/voice/session" -H 'content-type: application/json' \
    -d '{"sessionId":"bench-1","agentId":"a","customerId":"c","metaTags":{"env":"bench"}}' >/dev/null
  local threads=$(( conns < 2 ? 1 : 2 ))
  local out; out=$(wrk -t"$threads" -c"$conns" -d10s --latency -s benches/load/llm.lua "http://127.0.0.1:$port/api/v1/voice/llm")
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  echo "| $fsync | $conns | $rps | $p50 | $p99 | ${non2xx:-0} |"
  kill -TERM $pid; wait $pid || true
}
echo "| fsync | connections | requests/s | p50 | p99 | non-2xx |"
echo "|---|---|---|---|---|---|"
run always 1
run always 8
run always 64
run never 64
