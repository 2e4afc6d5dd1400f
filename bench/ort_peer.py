#!/usr/bin/env python3
"""The onnxruntime peer of the engine benchmark, driven by `botfleet-bench engine`: python
onnxruntime's own session (one intra-op thread, sequential, CPU provider, default graph
optimisations) on the same models and input files, so that its runs can be interleaved run
by run with tract and botfleet's ONNX Runtime backend.

One JSON request per line on stdin, one JSON answer per line on stdout:

    {"op": "load", "model": PATH, "inputs": [{"name", "shape", "file"}],
     "compare": {"tract": [{"name", "file"}], ...}}
        -> {"onnxruntime": VERSION, "max_abs_diff": {"tract": X, ...}}
    {"op": "run"}  -> {"ms": T}   (one inference, timed around session.run)
    {"op": "quit"}

A request that fails is answered {"error": MESSAGE}.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def max_abs_diff(names, results, files):
    """Largest difference between our outputs and the little-endian FP32 files given."""
    worst = 0.0
    for o in files:
        if o["name"] not in names:
            continue
        theirs = np.fromfile(o["file"], dtype="<f4")
        ours = np.asarray(results[names.index(o["name"])], dtype=np.float32).ravel()
        if ours.size != theirs.size:
            return float("inf")
        if ours.size:
            worst = max(worst, float(np.max(np.abs(ours - theirs))))
    return worst


class Peer:
    def __init__(self):
        self.session = None
        self.feed = None

    def load(self, req):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(req["model"], options,
                                            providers=["CPUExecutionProvider"])
        self.feed = {i["name"]: np.fromfile(i["file"], dtype="<f4").reshape(i["shape"])
                     for i in req["inputs"]}
        results = self.session.run(None, self.feed)
        names = [o.name for o in self.session.get_outputs()]
        diffs = {k: max_abs_diff(names, results, v) for k, v in req.get("compare", {}).items()}
        return {"onnxruntime": ort.__version__, "max_abs_diff": diffs}

    def run(self, _req):
        t = time.perf_counter()
        self.session.run(None, self.feed)
        return {"ms": (time.perf_counter() - t) * 1e3}


def main():
    peer = Peer()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            answer = getattr(peer, req["op"])(req)
        except Exception as e:  # the harness records the reason and goes on without the peer
            answer = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
