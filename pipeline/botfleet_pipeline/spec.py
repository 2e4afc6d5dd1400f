"""What every model file of this pipeline looks like, and helpers that need only onnx.

Kept free of torch so that evaluation (and the quantization of an existing ONNX file)
runs where only onnx and onnxruntime are installed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx

INPUT = "x"
OUTPUT = "logits"
OPSET = 18
CLASSES = 10
INPUT_SHAPE = (1, 8, 8)


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drops exporter metadata (stack traces with local paths, FX node text, doc strings)
    in place, so a file's bytes depend on its graph and weights only."""

    def clear_graph(graph: onnx.GraphProto) -> None:
        del graph.metadata_props[:]
        graph.doc_string = ""
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    clear_graph(attr.g)
                for g in attr.graphs:
                    clear_graph(g)
        for seq in (graph.input, graph.output, graph.value_info):
            for value in seq:
                del value.metadata_props[:]
                value.doc_string = ""
        for init in graph.initializer:
            init.doc_string = ""
            del init.metadata_props[:]

    del model.metadata_props[:]
    model.doc_string = ""
    clear_graph(model.graph)
    return model


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    Path(path).write_bytes(model.SerializeToString(deterministic=True))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
