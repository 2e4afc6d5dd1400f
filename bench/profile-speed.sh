#!/usr/bin/env bash
# tract's speed in two builds of the agent: each fixture of bench/fixtures.json through
# `botfleet-agent bench --engine tract` (one thread, the deterministic reference input),
# the two binaries alternating, ROUNDS rounds each. One JSON line per fixture on stdout:
# {"fixture", "p50_ms": [variant, reference], "load_ms": [variant, reference]}, medians of
# the rounds. Run by bench/run.sh --profiles.
#
#   bench/profile-speed.sh VARIANT_AGENT REFERENCE_AGENT
set -euo pipefail
cd "$(dirname "$0")/.."
variant=$1 reference=$2
rounds=${ROUNDS:-3} runs=${RUNS:-60}
python3 - "$variant" "$reference" "$rounds" "$runs" <<'PY'
import json, statistics, subprocess, sys
from pathlib import Path

variant, reference, rounds, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for entry in json.loads(Path("bench/fixtures.json").read_text()):
    model = Path(entry["file"])
    if entry.get("optional") and not model.is_file():
        continue
    inputs = [
        f"{i['name']}:{i['datatype']}:{'x'.join(str(d) for d in i['shape'])}"
        for i in entry["inputs"]
    ]
    args = ["bench", "--model", str(model), "--warmup", "5", "--runs", runs, "--engine", "tract", "--json"]
    for i in inputs:
        args += ["--input", i]
    got = {variant: [], reference: []}
    for _ in range(rounds):
        for binary in (variant, reference):
            out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
            got[binary].append(json.loads(out.stdout))
    med = lambda b, k: statistics.median(r[k] for r in got[b])  # noqa: E731
    print(json.dumps({
        "fixture": entry["name"],
        "p50_ms": [med(variant, "p50_ms"), med(reference, "p50_ms")],
        "load_ms": [med(variant, "load_ms"), med(reference, "load_ms")],
    }))
PY
