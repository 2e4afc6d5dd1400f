#!/usr/bin/env python3
"""The onnxruntime peer of the engine benchmark: the same models on the same inputs (written
by `botfleet-bench engine`), one intra-op thread, timed per run like tract.

    ort_peer.py ENGINE_JSON OUT_JSON
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def summary(samples):
    s = sorted(samples)
    n = len(s)

    def pct(p):
        # Nearest rank, as botfleet_engine::percentile.
        rank = max(1, min(n, int(-(-p * n // 100))))
        return s[rank - 1]

    return {"n": n, "min": s[0], "p25": pct(25), "p50": pct(50), "p75": pct(75),
            "p99": pct(99), "max": s[-1]}


def main():
    engine = json.load(open(sys.argv[1]))
    out = []
    for f in engine["fixtures"]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(f["model"], options, providers=["CPUExecutionProvider"])
        feed = {i["name"]: np.fromfile(i["file"], dtype="<f4").reshape(i["shape"])
                for i in f["inputs"]}
        results = session.run(None, feed)
        names = [o.name for o in session.get_outputs()]
        worst = 0.0
        for o in f["outputs"]:
            if o["name"] in names:
                ours = np.fromfile(o["file"], dtype="<f4")
                theirs = np.asarray(results[names.index(o["name"])], dtype=np.float32).ravel()
                if ours.size == theirs.size:
                    worst = max(worst, float(np.max(np.abs(ours - theirs))) if ours.size else 0.0)
        for _ in range(5):
            session.run(None, feed)
        times = []
        for _ in range(f["runs"]):
            t = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - t) * 1e3)
        out.append({"fixture": f["fixture"], "runs": f["runs"], "ort_1_thread_ms": summary(times),
                    "max_abs_diff_vs_tract": worst})
        print(f"ort {f['fixture']}: {f['runs']} runs", flush=True)
    json.dump({"onnxruntime": ort.__version__, "fixtures": out}, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
