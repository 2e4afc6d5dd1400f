#!/usr/bin/env bash
# Rollout to 1,000 simulated devices (three waves: 1 canary, 10 %, 100 %) through the
# embedded broker and through Mosquitto; prints timings and the server's CPU and memory.
#
#   bench/rollout-1000.sh [DEVICES]           release build of botfleet-server
#   PROFILE=dev bench/rollout-1000.sh         the debug build cargo test uses
#
# Needs mosquitto on PATH (or BOTFLEET_MOSQUITTO_URL) and one file descriptor per device.
set -euo pipefail
cd "$(dirname "$0")/.."
export BOTFLEET_BENCH_DEVICES="${1:-1000}"
profile="${PROFILE:-release}"
if [ "$(ulimit -n)" -lt $((BOTFLEET_BENCH_DEVICES + 256)) ]; then
    ulimit -n "$(ulimit -Hn)"
fi
if [ "$profile" = release ]; then flag=(--release); dir=release; else flag=(); dir=debug; fi
cargo build "${flag[@]}" -q -p botfleet-server --locked
export BOTFLEET_BENCH_SERVER="$PWD/target/$dir/botfleet-server"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB, $(date -u +%F); server build: $profile"
cargo test "${flag[@]}" -q -p botfleet-e2e --test fleet_bench --locked -- --ignored --nocapture --test-threads 1 2>&1 \
    | grep -oE 'BENCH .*|test result.*'
