"""Train a model, quantize it, check it, register it with botfleet-server and roll it out.

train -> quantize -> evaluate -> register -> start_rollout -> wait_for_rollout

The first three tasks run ``python -m botfleet_pipeline ...`` (pipeline/): the same argv
in both modes, chosen by ``BOTFLEET_PIPELINE_MODE`` (else the Airflow Variable
``botfleet_pipeline_mode``, e.g. ``AIRFLOW_VAR_BOTFLEET_PIPELINE_MODE``):

- ``kubernetes`` (default): KubernetesPodOperator pods. ``train`` runs
  ``ghcr.io/botfleet/pipeline-train:<tag>`` on a GPU training node (label
  ``botfleet.io/role=train``); ``quantize`` and ``evaluate`` run
  ``ghcr.io/botfleet/pipeline-edge:<tag>`` on a Jetson joined as a K3s agent (label
  ``botfleet.io/role=edge``, taint ``edge=true:NoSchedule``), so the INT8 variant is made
  and measured on the hardware it is meant for. Every pod requests one
  ``nvidia.com/gpu`` and uses the ``nvidia`` RuntimeClass; all share the ReadWriteMany
  volume ``botfleet-models`` at ``/models``, which the Airflow workers mount there too.
  The pods run as the images' uid and gid 10001, with ``fsGroup`` 10001 so the volume is
  theirs (changed only on a root mismatch; NFS-backed volumes ignore it: deploy/k3s).
  ``<tag>`` is ``BOTFLEET_PIPELINE_IMAGE_TAG``.
- ``local``: the same commands as BashOperator subprocesses in the pipeline's own venv
  (``BOTFLEET_PIPELINE_PYTHON``, default ``pipeline/.venv/bin/python``), artifacts under
  ``BOTFLEET_MODELS_DIR`` (default ``$TMPDIR/botfleet-models``). This is what
  ``.ci/airflow-check`` runs end to end with ``airflow dags test``.

``register``, ``start_rollout`` and ``wait_for_rollout`` run in the Airflow worker with
``botfleet_pipeline.ship`` (standard library only) and the HTTP connection ``botfleet``
(``AIRFLOW_CONN_BOTFLEET=http://botfleet-server:8080``; its password, if any, is sent as
the bearer token). In local mode this file puts ``pipeline/`` on ``sys.path``; in the
cluster, install the package on the workers with ``pip install --no-deps ./pipeline``.

``dataset`` (with ``dataset_digest`` and ``dataset_labels``, all optional) names a data-set
export of botfleet-server (``botfleet-server dataset export ID --output FILE``) where the
train step can read it (in the cluster, on the ``botfleet-models`` volume): ``train
--dataset`` checks it and adds its samples to the training data, and the registered model's
provenance names its digest (``dataset``: ``sha256:<digest>``).

The fleet has the last word: ``evaluate`` can stop a model whose top-1 agreement with its
float parent is below ``min_agreement`` (``offline_check``), and the robots run the same
check on the evaluation set that travels with the model before they serve it.
``wait_for_rollout`` fails with the robots' reasons when they rejected the model or the
rollout was rolled back.

Retries are safe: the upload is idempotent by (slot, version, bytes), and the rollout
request carries ``Idempotency-Key: {{ run_id }}``, so a retried task answers the rollout the
first try made instead of starting a second one.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, Variable, task

MODE = os.environ.get("BOTFLEET_PIPELINE_MODE") or Variable.get(
    "botfleet_pipeline_mode", default="kubernetes"
)
if MODE not in ("kubernetes", "local"):
    raise ValueError(f"BOTFLEET_PIPELINE_MODE / botfleet_pipeline_mode: {MODE!r} is not kubernetes or local")

SLOT = "digits"
MODEL_NAME = "digits-cnn"
CONN_ID = "botfleet"
PIPELINE_SRC = Path(
    os.environ.get("BOTFLEET_PIPELINE_SRC") or Path(__file__).resolve().parents[3] / "pipeline"
)
if MODE == "kubernetes":
    MODELS_DIR = "/models"
else:
    MODELS_DIR = os.environ.get("BOTFLEET_MODELS_DIR") or str(Path(tempfile.gettempdir()) / "botfleet-models")
    # register/start_rollout/wait_for_rollout import botfleet_pipeline.ship from the checkout.
    if str(PIPELINE_SRC) not in sys.path:
        sys.path.insert(0, str(PIPELINE_SRC))

RUN = f"{MODELS_DIR}/{{{{ run_id }}}}"
# The uid and gid the pipeline images run as (pipeline/images/Dockerfile).
PIPELINE_UID = 10001
MODEL_FILE = "model.int8.onnx"
EVALUATION_FILE = "evaluation.json"

# --device auto: CUDA on the cluster's training node, the CPU on a machine without a GPU.
# --dataset*: a botfleet-server data-set export to train on as well; an empty value (the
# params' default, null) is the same as no flag.
TRAIN = [
    "train",
    "--out",
    RUN,
    "--seed",
    "{{ params.seed }}",
    "--epochs",
    "{{ params.epochs }}",
    "--device",
    "auto",
    "--dataset",
    '{{ params.dataset or "" }}',
    "--dataset-digest",
    '{{ params.dataset_digest or "" }}',
    "--dataset-labels",
    '{{ params.dataset_labels or "" }}',
]
QUANTIZE = [
    "quantize",
    "--run",
    RUN,
    "--method",
    "{{ params.method }}",
    "--calibration",
    "{{ params.calibration }}",
    "--out",
    f"{RUN}/{MODEL_FILE}",
]
EVALUATE = [
    "evaluate",
    "--run",
    RUN,
    "--model",
    f"{RUN}/{MODEL_FILE}",
    "--export-gate",
    f"{RUN}/{EVALUATION_FILE}",
    "--gate",
    f"{RUN}/{EVALUATION_FILE}",
    "--gate-samples",
    "{{ params.evaluation_samples }}",
    # 0 never fails: with offline_check off, the robots' accuracy gate is what judges.
    "--min-agreement",
    "{{ params.min_agreement if params.offline_check else 0 }}",
    "--report",
    f"{RUN}/evaluate.json",
]

# The robots' benchmark gate (manifest `gate`) and the rollout strategy, both overridable
# per run through the DAG run's conf.
BENCH_GATE = {"warmup_runs": 3, "runs": 20, "max_p99_ms": 25.0, "max_regression": 0.2}
STRATEGY = {
    "waves": [{"count": 1}, {"percent": 10}, {"percent": 100}],
    "bake_s": 600,
    "success_threshold": 0.95,
    "error_threshold": 0.05,
    "on_error": "rollback",
    "deadline_s": 3600,
    "gate": {"max_p99_regression_percent": 10},
}


def _kubernetes_step(task_id: str, argv: list[str], role: str):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    tag = os.environ.get("BOTFLEET_PIPELINE_IMAGE_TAG", "0.1.0")
    image = {"train": "pipeline-train", "edge": "pipeline-edge"}[role]
    term = k8s.V1NodeSelectorTerm(
        match_expressions=[
            k8s.V1NodeSelectorRequirement(key="botfleet.io/role", operator="In", values=[role])
        ]
    )
    affinity = k8s.V1Affinity(
        node_affinity=k8s.V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=k8s.V1NodeSelector(node_selector_terms=[term])
        )
    )
    tolerations = (
        [k8s.V1Toleration(key="edge", operator="Equal", value="true", effect="NoSchedule")]
        if role == "edge"
        else []
    )
    resources = (
        k8s.V1ResourceRequirements(
            requests={"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
            limits={"memory": "8Gi", "nvidia.com/gpu": "1"},
        )
        if role == "train"
        else k8s.V1ResourceRequirements(requests={"nvidia.com/gpu": "1"}, limits={"nvidia.com/gpu": "1"})
    )
    return KubernetesPodOperator(
        task_id=task_id,
        name=f"botfleet-{task_id}",
        namespace=os.environ.get("BOTFLEET_K8S_NAMESPACE", "ml"),
        image=f"ghcr.io/botfleet/{image}:{tag}",
        cmds=["python", "-m", "botfleet_pipeline"],
        arguments=argv,
        affinity=affinity,
        tolerations=tolerations,
        container_resources=resources,
        # KubernetesPodOperator has no runtime-class parameter: the pod spec carries it.
        full_pod_spec=k8s.V1Pod(spec=k8s.V1PodSpec(runtime_class_name="nvidia", containers=[])),
        volumes=[
            k8s.V1Volume(
                name="models",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name="botfleet-models"),
            )
        ],
        volume_mounts=[k8s.V1VolumeMount(name="models", mount_path=MODELS_DIR)],
        # The images' user (pipeline/images/Dockerfile); fsGroup gives it the shared volume,
        # whose ownership is changed only when its root is not the group's already.
        security_context=k8s.V1PodSecurityContext(
            run_as_user=PIPELINE_UID,
            run_as_group=PIPELINE_UID,
            run_as_non_root=True,
            fs_group=PIPELINE_UID,
            fs_group_change_policy="OnRootMismatch",
        ),
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
    )


def _local_step(task_id: str, argv: list[str]):
    from airflow.providers.standard.operators.bash import BashOperator

    default_python = PIPELINE_SRC / ".venv" / "bin" / "python"
    python = os.environ.get("BOTFLEET_PIPELINE_PYTHON") or str(default_python)
    return BashOperator(
        task_id=task_id,
        bash_command=shlex.join([python, "-m", "botfleet_pipeline", *argv]),
        cwd=str(PIPELINE_SRC),
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        append_env=True,
        do_xcom_push=False,
    )


def step(task_id: str, argv: list[str], role: str):
    """One pipeline step: a pod on a ``role`` node, or a local subprocess, same argv."""
    if MODE == "kubernetes":
        return _kubernetes_step(task_id, argv, role)
    return _local_step(task_id, argv)


def _server():
    """botfleet-server from the ``botfleet`` connection (its password is the API token)."""
    from airflow.providers.http.hooks.http import HttpHook
    from botfleet_pipeline.client import Server

    hook = HttpHook(method="GET", http_conn_id=CONN_ID)
    hook.get_conn()
    conn = hook.get_connection(CONN_ID)
    return Server.at(hook.base_url, conn.password or None)


@task(retries=3, retry_delay=timedelta(seconds=30))
def register(**context) -> dict:
    """Uploads the INT8 model with its metadata and evaluation set; the server checks it
    loads and fits the set, signs the manifest and stores both."""
    from botfleet_pipeline import ship

    params = context["params"]
    run = Path(MODELS_DIR) / context["run_id"]
    model = run / MODEL_FILE
    version = params["version"] or context["dag_run"].run_after.strftime("%Y%m%dT%H%M%S")
    metadata = ship.model_metadata(
        run,
        model,
        slot=SLOT,
        name=MODEL_NAME,
        version=version,
        pipeline_run=context["run_id"],
        min_agreement=params["min_agreement"],
        gate=params["gate"],
        commit=os.environ.get("BOTFLEET_PIPELINE_COMMIT") or None,
        source=f"airflow:{context['dag'].dag_id}",
    )
    record = ship.register(_server(), model, metadata, run / EVALUATION_FILE)
    return {k: record[k] for k in ("slot", "version", "release", "sha256")}


@task(retries=3, retry_delay=timedelta(seconds=30))
def start_rollout(record: dict, idempotency_key: str, **context) -> dict:
    """Rolls the registered bytes out to the devices matching ``selector``."""
    from botfleet_pipeline import ship

    params = context["params"]
    return ship.start_rollout(
        _server(),
        slot=record["slot"],
        version=record["version"],
        sha256=record["sha256"],
        idempotency_key=idempotency_key,
        selector=params["selector"],
        strategy=params["strategy"],
    )


# Not retried: a verdict does not change on asking again (a paused rollout that an
# operator resumes is waited for by clearing this task).
@task(retries=0)
def wait_for_rollout(created: dict, **context) -> dict:
    """Fails with the robots' reasons unless the fleet took the model."""
    from botfleet_pipeline import ship

    rollout = ship.wait_for_rollout(
        _server(), created["rollout_id"], timeout_s=context["params"]["rollout_timeout_s"]
    )
    return {
        "rollout_id": rollout["rollout_id"],
        "state": rollout["state"],
        "summary": rollout["summary"],
        "sha256": rollout["sha256"],
    }


with DAG(
    dag_id="botfleet_train_and_ship",
    description="Train, quantize on a Jetson, check, register the model, roll it out and wait for the fleet",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "selector": Param("site=lab,arch=aarch64", type="string", description="robots to roll out to"),
        "version": Param(None, type=["null", "string"], description="model version; default: the run time"),
        "seed": Param(0, type="integer", minimum=0),
        "epochs": Param(15, type="integer", minimum=1),
        "dataset": Param(
            None,
            type=["null", "string"],
            description="a botfleet-server data-set export (tar) the train step reads, e.g. under "
            "/models; its samples join the training data and its digest goes into the provenance",
        ),
        "dataset_digest": Param(
            None,
            type=["null", "string"],
            description="the export's digest (X-Botfleet-Dataset-Digest); train refuses another",
        ),
        "dataset_labels": Param(
            None,
            type=["null", "string"],
            description="labels.csv (sha256,label) for the export; default: the fleet model's top-1",
        ),
        "method": Param("ptq", enum=["ptq", "qat"]),
        "calibration": Param(
            "data",
            enum=["data", "constant", "zeros", "scaled"],
            description="ptq calibration; anything but data is deliberately broken",
        ),
        "min_agreement": Param(0.95, type="number", minimum=0, maximum=1),
        "offline_check": Param(True, type="boolean", description="evaluate fails below min_agreement"),
        "evaluation_samples": Param(64, type="integer", minimum=1, maximum=360),
        "gate": Param(BENCH_GATE, type="object", description="the robots' benchmark gate"),
        "strategy": Param(STRATEGY, type="object", description="waves, thresholds, deadline"),
        "rollout_timeout_s": Param(14400, type="integer", minimum=1),
    },
    tags=["botfleet", "edge"],
) as dag:
    train = step("train", TRAIN, role="train")
    quantize = step("quantize", QUANTIZE, role="edge")
    evaluate = step("evaluate", EVALUATE, role="edge")
    registered = register()
    started = start_rollout(registered, idempotency_key="{{ run_id }}")
    train >> quantize >> evaluate >> registered
    wait_for_rollout(started)
