"""The DAG's defaults against the server's OpenAPI schemas, read from the DAG's source
(``ast``) so that the test needs no Airflow."""

from __future__ import annotations

import ast
from pathlib import Path

import openapi
import pytest

DAG = Path(__file__).resolve().parents[2] / "examples" / "airflow" / "dags" / "botfleet_train_and_ship.py"


def constants(*names: str) -> dict:
    """The literal values the DAG module assigns to ``names`` at its top level."""
    found = {}
    for node in ast.parse(DAG.read_text(), filename=str(DAG)).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in names:
            found[target.id] = ast.literal_eval(node.value)
    missing = set(names) - set(found)
    assert not missing, f"{DAG} assigns no literal {sorted(missing)}"
    return found


def test_the_dags_default_benchmark_gate_is_one_the_server_takes():
    gate = constants("BENCH_GATE")["BENCH_GATE"]
    metadata = {"slot": "digits", "name": "digits-cnn", "version": "1.0.0", "gate": gate}
    assert not openapi.errors("ModelMetadata", metadata)


def test_the_dags_default_strategy_is_one_the_server_takes():
    strategy = constants("STRATEGY")["STRATEGY"]
    assert not openapi.errors("Strategy", strategy)
    assert not openapi.errors("RolloutRequest", {"slot": "digits", "version": "1.0.0", "strategy": strategy})


META = {"slot": "s", "name": "n", "version": "1"}


@pytest.mark.parametrize(
    ("name", "instance"),
    [
        ("Strategy", {"gate": {"max_p99_regression": 10}}),
        ("Strategy", {"gate": {}}),
        ("Strategy", {"waves": [{"percent": 10, "count": 1}]}),
        ("Strategy", {"waves": [{"percent": 10, "canary": True}]}),
        # A gate without its run counts: the server's parser has no default for them.
        ("ModelMetadata", {**META, "gate": {"max_p99_ms": 25.0}}),
        ("ModelMetadata", {**META, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "tag": 1}]}),
    ],
)
def test_the_schemas_refuse_what_the_servers_parser_refuses(name, instance):
    assert openapi.errors(name, instance)
