#!/usr/bin/env bash
# Every benchmark section, then BENCHMARKS.md written from this run's results.
#
#   bench/run.sh              the full run (about 25 min on 2 cores, build included)
#   bench/run.sh --quick      short settings, to check the harness (numbers not worth quoting)
#   bench/run.sh --profiles   also release-profile variants of the agent (a 7-16 min build each)
#   bench/run.sh --build-only / --no-build   the two halves: build, then measure what was built
#   bench/run.sh --sections engine,serving   only these (serving engine swap shadow capture upload
#                             footprint download fleet criterion); the report keeps the other
#                             sections' figures from the existing BENCHMARKS.md, marked with the
#                             run they come from
#
# Needs python3 (with venv), mosquitto on PATH (or BOTFLEET_MOSQUITTO_URL) and an open-file
# limit of at least 12,000 (each process) for the 10,000-device fleet. The fleet section runs
# 1,000 and 10,000 devices through each broker (one simulator process, one broker), then
# 100,000 through Mosquitto alone (the embedded broker refuses beyond 1,000 by design): one
# process holds at most 15,000 sessions (its open files), so that run bridges a Mosquitto leaf
# per 15,000 devices to a central one the server talks to, each leaf with one botfleet-sim
# process (without BOTFLEET_MOSQUITTO_URL only). Results: target/bench/*.json.
# Binaries come from $CARGO_TARGET_DIR (default target); criterion writes to target/criterion.
# BOTFLEET_BENCH_BEFORE=path/to/botfleet-server (and BOTFLEET_BENCH_BEFORE_LABEL): the fleet
# section also runs the Mosquitto fleets with that server binary, in the same run, marked.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
profiles=0
build=1
measure=1
all_sections=(serving engine swap shadow capture upload footprint download fleet criterion)
sections=("${all_sections[@]}")
args=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=(--quick) ;;
        --profiles) profiles=1 ;;
        --build-only) measure=0 ;;
        --no-build) build=0 ;;
        --sections)
            [ $# -ge 2 ] || { echo "--sections needs a list" >&2; exit 2; }
            IFS=, read -r -a sections <<< "$2"
            for s in "${sections[@]}"; do
                [[ " ${all_sections[*]} " == *" $s "* ]] || { echo "unknown section $s" >&2; exit 2; }
            done
            shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
wants() { [[ " ${sections[*]} " == *" $1 "* ]]; }
started=$(date +%s)
# What is measured, read before the run writes BENCHMARKS.md.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit with uncommitted changes"
out=target/bench
target=${CARGO_TARGET_DIR:-target}
export CRITERION_HOME=$PWD/target/criterion
log() { echo "[$(date -u +%T)] $*"; }

# One release build of everything measured. The engine's multithread feature is only used by
# its 2-thread benchmark; enabling it for the whole build avoids a second build of tract.
features=(--features botfleet-engine/multithread)
# Every release binary links tract with thin LTO: several minutes each on 2 cores, so the
# run builds only what it measures. (`cargo bench -p botfleet-agent --bench serve` is the
# criterion view of section 1; the harness measures the same with percentiles.)
if [ "$build" = 1 ]; then
    log "release build"
    packages=(-p botfleet-e2e)
    bins=(--bin botfleet-bench)
    if wants footprint || wants fleet; then
        packages+=(-p botfleet-agent -p botfleet-server)
        bins+=(--bin botfleet-agent --bin botfleet-server)
    fi
    cargo build --release --locked "${features[@]}" "${packages[@]}" "${bins[@]}"
    # The agent measured (size, memory, cold start) is the one a robot gets: built alone,
    # without the features the test crate unifies into a joint build (38.9 against 32.2 MB
    # on 2026-12-07). It replaces the joint build's agent binary.
    if wants footprint; then
        cargo build --release --locked -p botfleet-agent
    fi
    if wants criterion; then
        cargo bench --locked "${features[@]}" -p botfleet-engine --bench inference --no-run
    fi
    # The fleet's simulated devices are the load generator, not what is measured: the debug
    # build `cargo test` uses serves (the server under test is the release binary).
    if wants fleet; then
        cargo test --locked -p botfleet-e2e --test fleet_bench --no-run
    fi
fi
[ "$measure" = 1 ] || exit 0
# Results of earlier runs never mix with this one's: a section not rerun keeps its figures
# in BENCHMARKS.md, not its JSON.
rm -rf "$out"
mkdir -p "$out"
if wants criterion; then rm -rf target/criterion; fi

if [ ! -x bench/.venv/bin/python ]; then
    log "onnxruntime venv"
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install -q onnxruntime==1.32.0 numpy
fi
# The same library python onnxruntime runs is botfleet's ONNX Runtime backend here.
ort_lib=$(ls "$PWD"/bench/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -1)
export ORT_DYLIB_PATH=$ort_lib

bench=$target/release/botfleet-bench
for section in serving engine swap shadow capture upload footprint download; do
    wants "$section" || continue
    log "$section"
    # A section that fails is reported as not measured; the others still run.
    "$bench" --out "$out" "${quick[@]}" --onnxruntime-library "$ort_lib" "$section" \
        || echo "section $section failed" >&2
done

if wants fleet; then
    log "fleet fan-out"
    sizes=(1000 10000)
    spread_sizes=(100000)
    if [ ${#quick[@]} -gt 0 ]; then sizes=(200); spread_sizes=(20000); fi
    # Every process of a fleet (test, simulators, brokers) inherits this limit; above 15,000
    # devices the test spreads them so that each stays under it.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 12000 ]; then
        ulimit -n 65536 2>/dev/null || echo "open-file limit $(ulimit -n): 10,000 devices may fail" >&2
    fi
    # fleet_run BROKER N SERVER [LABEL]: one fleet; a run that fails is recorded with the
    # reason, so the report says so.
    fleet_run() {
        local broker=$1 n=$2 server=$3 label=${4:-} log="$out/fleet-$1-$2${4:+-before}.log"
        if ! BOTFLEET_BENCH_DEVICES=$n BOTFLEET_BENCH_WAVES=one \
            BOTFLEET_BENCH_OUT="$PWD/$out/fleet.jsonl" BOTFLEET_BENCH_SERVER="$server" \
            BOTFLEET_BENCH_LABEL="$label" \
            cargo test --locked -q -p botfleet-e2e --test fleet_bench -- --ignored \
            "$broker" > "$log" 2>&1; then
            why=$(grep -m1 -A1 'panicked at' "$log" | tail -1 | tr -d '"\\')
            printf '{"broker": "%s", "devices": %s, "failed": "%s"%s}\n' "$broker" "$n" "$why" \
                "${label:+, \"server\": \"$label\"}" >> "$out/fleet.jsonl"
            echo "fleet benchmark, $broker, $n devices failed: $why" >&2
        fi
    }
    for n in "${sizes[@]}"; do
        for broker in embedded mosquitto; do
            fleet_run "$broker" "$n" "$(realpath "$target")/release/botfleet-server"
        done
        if [ -n "${BOTFLEET_BENCH_BEFORE:-}" ]; then
            fleet_run mosquitto "$n" "$(realpath "$BOTFLEET_BENCH_BEFORE")" \
                "before: ${BOTFLEET_BENCH_BEFORE_LABEL:-$BOTFLEET_BENCH_BEFORE}"
        fi
    done
    if [ -z "${BOTFLEET_MOSQUITTO_URL:-}" ]; then
        for n in "${spread_sizes[@]}"; do
            fleet_run mosquitto "$n" "$(realpath "$target")/release/botfleet-server"
        done
    fi
fi

report() {
    local elapsed=$(( $(date +%s) - started ))
    # The library's version from its file name (libonnxruntime.so.1.32.0).
    printf '{"date": "%s", "duration": "%d min %02d s", "command": "bench/run.sh %s", "onnxruntime": "%s", "commit": "%s"}\n' \
        "$(date -u +%F)" $((elapsed / 60)) $((elapsed % 60)) "${args[*]}" \
        "${ort_lib##*.so.}" "$commit" > "$out/run.json"
    # Without the criterion section, its figures (and the 2-thread column) are kept, not reread.
    local crit=target/criterion
    wants criterion || crit=$out/criterion-not-run
    "$bench" --out "$out" report --write BENCHMARKS.md --criterion "$crit"
}
size() { stat -c %s "$1"; }
if wants footprint; then
    printf '{"botfleet-agent": %s, "botfleet-server": %s}\n' \
        "$(size "$target/release/botfleet-agent")" "$(size "$target/release/botfleet-server")" > "$out/sizes.json"
fi
# A first report now, in case the criterion run below is cut short.
report

if wants criterion; then
    log "criterion"
    if [ ${#quick[@]} -gt 0 ]; then times=(--warm-up-time 0.2 --measurement-time 0.5); else times=(--warm-up-time 1 --measurement-time 4); fi
    # Built here if needed (after the other sections, so the build does not disturb them).
    cargo bench --locked "${features[@]}" -p botfleet-engine --bench inference -- "${times[@]}" \
        || echo "criterion benchmarks failed" >&2
fi

if [ "$profiles" = 1 ]; then
    # name:opt-level:lto:codegen-units:tract opt-level ("-": as the rest). Each variant's
    # tract speed is measured against the workspace release agent, interleaved.
    for variant in "opt3-fat:3:fat:1:-" "opts-fat-tract3:s:fat:1:3"; do
        IFS=: read -r name opt lto units tract <<< "$variant"
        log "profile $name"
        overrides=()
        if [ "$tract" != - ]; then
            for crate in tract-linalg tract-core tract-data tract-onnx-opl; do
                overrides+=(--config "profile.release.package.$crate.opt-level=$tract")
            done
        fi
        t=$(date +%s)
        CARGO_PROFILE_RELEASE_OPT_LEVEL=$opt CARGO_PROFILE_RELEASE_LTO=$lto \
            CARGO_PROFILE_RELEASE_CODEGEN_UNITS=$units \
            cargo build --release --locked -p botfleet-agent --target-dir "target/profile-$name" \
            "${overrides[@]}"
        built=$(( $(date +%s) - t ))
        speed=$(bench/profile-speed.sh "target/profile-$name/release/botfleet-agent" \
            "$target/release/botfleet-agent" | paste -sd, -)
        printf '{"variant": "opt-level %s, lto %s, codegen-units %s%s", "bytes": %s, "build_s": %s, "tract": [%s]}\n' \
            "$opt" "$lto" "$units" "${overrides:+, tract crates at opt-level $tract}" \
            "$(size "target/profile-$name/release/botfleet-agent")" "$built" "$speed" \
            >> "$out/profiles.jsonl"
    done
fi

report
log "BENCHMARKS.md written"
