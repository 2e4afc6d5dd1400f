#!/usr/bin/env bash
# Telemetry cost on the robot: CPU and resident memory of the real `botfleet-agent`
# process with telemetry every 1 s and every 10 s, against a real `botfleet-server serve`
# (embedded broker), read from /proc/PID/stat and /proc/PID/status.
# A 3600 s interval is the baseline: the agent idles with one sample at start-up.
#
# Usage: bench/telemetry_cost.sh [SECONDS]      (default 60 per interval)
#   PROFILE=release bench/telemetry_cost.sh     measure a release build (default: debug)
#   TELEMETRY_ROOT=agent/tests/fixtures/sysfs/orin bench/telemetry_cost.sh
#                                               also read the Jetson sysfs probes (fake Orin)
# Prints a Markdown table for BENCHMARKS.md.
set -euo pipefail

cd "$(dirname "$0")/.."
duration=${1:-60}
profile=${PROFILE:-debug}
root=$(realpath "${TELEMETRY_ROOT:-/}")
if [[ $profile == release ]]; then
    cargo build --release -q -p botfleet-agent -p botfleet-server
else
    cargo build -q -p botfleet-agent -p botfleet-server
fi
bin=target/$profile
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
mqtt_port=$(free_port)

cat >"$work/server.toml" <<TOML
data_dir = "$work/server"
http_listen = "127.0.0.1:$http_port"
[mqtt]
embedded_listen = "127.0.0.1:$mqtt_port"
client_id = "bench-server"
TOML
"$bin/botfleet-server" serve --config "$work/server.toml" >"$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$http_port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
key=$("$bin/botfleet-server" pubkey --key "$work/server/signing.key")

clk_tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

echo "| telemetry interval | agent CPU (% of one core) | RSS at end (MiB) | peak RSS (MiB) | messages |"
echo "|---|---|---|---|---|"
for interval in 1 10 3600; do
    device="bench-$interval"
    cat >"$work/$device.toml" <<TOML
device_id = "$device"
data_dir = "$work/$device"
trusted_keys = ["$key"]
telemetry_interval_s = $interval
[mqtt]
url = "mqtt://127.0.0.1:$mqtt_port"
[inference]
listen = "127.0.0.1:0"
[telemetry]
root = "$root"
TOML
    RUST_LOG=warn "$bin/botfleet-agent" --config "$work/$device.toml" >"$work/$device.log" 2>&1 &
    agent=$!
    pids+=("$agent")
    # Connected once the server lists it online.
    for _ in $(seq 100); do
        curl -fsS "http://127.0.0.1:$http_port/api/v1/devices/$device" 2>/dev/null | grep -q '"online":true' && break
        sleep 0.1
    done
    sleep 5 # start-up settles (first sample, info, status)
    before=$(cpu_ticks "$agent")
    sleep "$duration"
    after=$(cpu_ticks "$agent")
    rss=$(status_kib "$agent" VmRSS)
    hwm=$(status_kib "$agent" VmHWM)
    messages=$(( duration / interval ))
    awk -v t=$((after - before)) -v hz="$clk_tck" -v d="$duration" -v r="$rss" -v h="$hwm" \
        -v i="$interval" -v m="$messages" \
        'BEGIN { printf "| %s s | %.3f | %.1f | %.1f | ~%d |\n", i, t / hz / d * 100, r / 1024, h / 1024, m }'
    kill "$agent"
    wait "$agent" 2>/dev/null || true
done
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d), profile $profile, telemetry root $root, ${duration} s per interval"
