"""The K3s deployment (deploy/k3s) and the pipeline images, checked without a cluster.

    python .ci/k8s_check.py RENDERED.yaml SERVER_BINARY WORKDIR

RENDERED.yaml is `kubectl kustomize deploy/k3s`. Three parts:

1. schemas: every object against the Kubernetes 1.31-1.37 schemas, strict;
2. consistency: the names the DAG uses, the Dockerfiles, the ports, probes, mounts and
   Secret keys against each other and deploy/k3s/README.md's commands;
3. the pods' configuration for real: the rendered ConfigMaps and the Secrets (minted by
   README.md's own commands) laid out under WORKDIR at the pods' mount paths, owned and
   moded as the pods' securityContext makes them; a real Mosquitto on mosquitto.conf and a
   real botfleet-server on botfleet-server.toml (as the pods' users when run as root),
   ports moved to free loopback ports; the server must connect over mutual TLS, answer
   /healthz, take the token and refuse a request without one, and a robot's certificate
   must reach the control plane through the ACL.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]
K3S = REPO / "deploy" / "k3s"
DAG = REPO / "examples" / "airflow" / "dags" / "botfleet_train_and_ship.py"
VERSIONS = [f"1.{minor}.0" for minor in range(31, 38)]
DEADLINE_S = 30


class CheckFailed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    check(len(found) == 1, f"{kind}/{name}: expected exactly one in deploy/k3s, found {len(found)}")
    return found[0]


def by_prefix(objects: list[dict], kind: str, prefix: str) -> dict:
    """A generated object (kustomize appends a content hash to the name)."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix + "-")]
    check(len(found) == 1, f"{kind}/{prefix}-<hash>: expected one, found {len(found)}")
    return found[0]


# -- 1. schemas ------------------------------------------------------------------------


def validate_schemas(objects: list[dict]) -> None:
    for version in VERSIONS:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                name = f"{obj['kind']}/{obj['metadata']['name']}"
                raise CheckFailed(f"{name} is not valid Kubernetes {version}: {e.message}") from e
    print(f"schemas: {len(objects)} objects valid against Kubernetes {VERSIONS[0]}-{VERSIONS[-1]} (strict)")


# -- 2. consistency ----------------------------------------------------------------------


def dag_strings() -> set[str]:
    """Every string literal in the DAG: the names it gives the cluster."""
    tree = ast.parse(DAG.read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def dag_uid() -> int:
    """The uid the DAG's pods run as (its ``PIPELINE_UID``)."""
    for node in ast.parse(DAG.read_text()).body:
        names = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and names == ["PIPELINE_UID"]:
            return ast.literal_eval(node.value)
    raise CheckFailed(f"{DAG}: no PIPELINE_UID (the uid of the pipeline's pods)")


def readme_lines() -> list[str]:
    """The shell commands of deploy/k3s/README.md's ```sh blocks, continuation lines joined."""
    text = (K3S / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(line)
    return commands


def readme_commands() -> list[list[str]]:
    return [shlex.split(line) for line in readme_lines()]


def readme_secrets(commands: list[list[str]]) -> dict[str, dict[str, str]]:
    """Secret name -> {key: source file} from `kubectl ... create secret generic NAME --from-file=K=F`."""
    secrets = {}
    for argv in commands:
        if argv[:1] == ["kubectl"] and "secret" in argv and "generic" in argv:
            name = argv[argv.index("generic") + 1]
            keys = {}
            for arg in argv:
                if arg.startswith("--from-file="):
                    key, _, source = arg.removeprefix("--from-file=").partition("=")
                    keys[key] = source or key
            secrets[name] = keys
    return secrets


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    check(len(containers) == 1, f"{deployment['metadata']['name']}: one container expected")
    return containers[0]


def port_number(ctr: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
    check(port in named, f"{ctr['name']}: no container port named {port!r}")
    return named[port]


def mounts(deployment: dict) -> list[tuple[str, dict]]:
    """(mountPath, volume) of the deployment's container, longest path first."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    out = [(m["mountPath"], volumes[m["name"]]) for m in container(deployment)["volumeMounts"]]
    return sorted(out, key=lambda pair: -len(pair[0]))


def mount_of(deployment: dict, path: str) -> tuple[str, dict]:
    for mount_path, volume in mounts(deployment):
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return mount_path, volume
    raise CheckFailed(f"{deployment['metadata']['name']}: {path} is on no mounted volume")


def same_keys(ours: dict, defaults: dict, where: str = "") -> None:
    """Every key of the deployment's TOML exists in the server's defaults, with its type."""
    for key, value in ours.items():
        name = f"{where}{key}"
        check(
            key in defaults,
            f"botfleet-server.toml: {name} is not a server setting (server/botfleet-server.toml)",
        )
        if isinstance(defaults[key], dict):
            check(isinstance(value, dict), f"botfleet-server.toml: {name} must be a table")
            same_keys(value, defaults[key], name + ".")
        else:
            check(type(value) is type(defaults[key]), f"botfleet-server.toml: {name} has the wrong type")


def file_of(deployment: dict, objects: list[dict], secrets: dict, path: str) -> None:
    """``path`` is on one of the deployment's volumes; on a ConfigMap or Secret, it is a key
    of it (the Secret's keys: those README.md's command gives it)."""
    mount_path, volume = mount_of(deployment, path)
    key = path.removeprefix(mount_path.rstrip("/") + "/")
    if "configMap" in volume:
        data = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
        check(key in data, f"{path}: ConfigMap {volume['configMap']['name']} has no key {key!r}")
    if "secret" in volume:
        name = volume["secret"]["secretName"]
        check(name in secrets, f"Secret {name} is mounted but deploy/k3s/README.md never creates it")
        check(key in secrets[name], f"{path}: README.md creates Secret {name} without the key {key!r}")


def stages(parser: DockerfileParser) -> dict[str, list[dict]]:
    """The Dockerfile's instructions per stage (``FROM … AS name``), each stage with the
    instructions of the stage it is built on first."""
    out: dict[str, list[dict]] = {}
    current: list[dict] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            image, _, name = instruction["value"].partition(" AS ")
            current = [*out.get(image.strip(), []), instruction]
            out[name.strip() or image.strip()] = current
        elif instruction["instruction"] != "COMMENT":
            current.append(instruction)
    return out


def check_images(dag: set[str]) -> None:
    path = REPO / "pipeline" / "images" / "Dockerfile"
    parser = DockerfileParser(path=str(path))
    targets = stages(parser)
    uid = dag_uid()
    for role in ("train", "edge"):
        image = f"pipeline-{role}"
        check(image in dag, f"the DAG no longer names the image {image}")
        check(role in targets, f"{path}: no target {role!r} (the DAG's {image})")
        check(
            f"--target {role}" in parser.content and f"ghcr.io/botfleet/{image}:" in parser.content,
            f"{path}: its header must say how to build ghcr.io/botfleet/{image} (--target {role})",
        )
        check(
            targets[role][0]["value"].startswith("python:3.11"),
            f"{path} target {role}: pyproject.toml needs Python 3.11",
        )
        runs = [i["value"] for i in targets[role] if i["instruction"] == "RUN"]
        check(
            any("requirements.lock" in r and "--require-hashes" in r for r in runs),
            f"{path} target {role}: the lock, with hashes",
        )
        check(
            any("pip install" in r and " ." in r for r in runs),
            f"{path} target {role}: must install the pipeline package",
        )
        check(
            any("/models" in r for r in runs), f"{path} target {role}: must create /models (the DAG's mount)"
        )
        users = [i["value"] for i in targets[role] if i["instruction"] == "USER"]
        check(bool(users) and not users[-1].startswith(("0", "root")), f"{path} target {role}: runs as root")
        check(
            users[-1:] == [f"{uid}:{uid}"],
            f"{path} target {role}: runs as {users[-1:]}, the DAG's pods as {uid}:{uid} (PIPELINE_UID)",
        )
    lock = (REPO / "pipeline" / "images" / "requirements.lock").read_text()
    pinned = dict(re.findall(r"^([a-z0-9-]+)==(\S+) \\$", lock, flags=re.M))
    project = tomllib.loads((REPO / "pipeline" / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        name, _, version = dep.partition("==")
        name = name.lower().replace("_", "-")
        check(
            pinned.get(name) == version,
            f"requirements.lock has {name} {pinned.get(name)}, pyproject.toml {version}: "
            "run pipeline/images/lock.py",
        )
    print(
        f"images: pipeline-train, pipeline-edge install the lock ({len(pinned)} wheels) "
        f"and the package, as uid {uid} (the DAG's pods too)"
    )


def check_consistency(objects: list[dict], dag: set[str]) -> dict:
    secrets = readme_secrets(readme_commands())
    namespaces = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    check(
        namespaces == ["ml"] and "ml" in dag,
        f"namespace: the DAG's default is ml, deploy/k3s has {namespaces}",
    )
    for obj in objects:
        if obj["kind"] not in ("Namespace", "RuntimeClass"):
            check(
                obj["metadata"].get("namespace") == "ml",
                f"{obj['kind']}/{obj['metadata']['name']} is not in ml",
            )

    models = one(objects, "PersistentVolumeClaim", "botfleet-models")
    check("botfleet-models" in dag, "the DAG no longer mounts botfleet-models")
    check(
        models["spec"]["accessModes"] == ["ReadWriteMany"],
        "botfleet-models must be ReadWriteMany (several nodes)",
    )
    runtime = one(objects, "RuntimeClass", "nvidia")
    check(
        "nvidia" in dag and runtime["handler"] == "nvidia",
        "RuntimeClass nvidia, handler nvidia, named by the DAG",
    )
    check(
        {"botfleet.io/role", "train", "edge", "/models", "nvidia.com/gpu"} <= dag,
        "the DAG's node roles/mount",
    )

    role = one(objects, "Role", "botfleet-pipeline-pods")
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    needed = {("pods", v) for v in ("create", "get", "list", "watch", "delete")} | {("pods/log", "get")}
    check(needed <= granted, f"Role botfleet-pipeline-pods lacks {sorted(needed - granted)}")
    binding = one(objects, "RoleBinding", "botfleet-pipeline-pods")
    check(binding["roleRef"]["name"] == "botfleet-pipeline-pods", "RoleBinding names the Role")
    check(
        any(
            s["kind"] == "ServiceAccount" and s["name"] == "airflow-worker" and s["namespace"] == "ml"
            for s in binding["subjects"]
        ),
        "RoleBinding: subject ServiceAccount ml/airflow-worker (README.md, Airflow)",
    )

    # The server: its TOML, the Deployment that mounts it, the Service in front.
    server = one(objects, "Deployment", "botfleet-server")
    check(
        server["spec"]["replicas"] == 1 and server["spec"]["strategy"]["type"] == "Recreate",
        "server: 1 replica, Recreate (redb)",
    )
    ctr = container(server)
    args = ctr["args"]
    config_path = args[args.index("--config") + 1]
    _, config_volume = mount_of(server, config_path)
    check("configMap" in config_volume, f"{config_path}: not on a ConfigMap")
    server_cm = by_prefix(objects, "ConfigMap", "botfleet-server-config")
    check(config_volume["configMap"]["name"] == server_cm["metadata"]["name"], "server mounts its ConfigMap")
    toml_text = server_cm["data"][Path(config_path).name]
    config = tomllib.loads(toml_text)
    same_keys(config, tomllib.loads((REPO / "server" / "botfleet-server.toml").read_text()))
    http_port = int(config["http_listen"].rsplit(":", 1)[1])
    check(port_number(ctr, "http") == http_port, "server: container port http = http_listen's port")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = ctr[probe]["httpGet"]
        check(
            get["path"] == "/healthz" and port_number(ctr, get["port"]) == http_port,
            f"server {probe}: /healthz",
        )
    _, data_volume = mount_of(server, config["data_dir"])
    check(
        data_volume.get("persistentVolumeClaim", {}).get("claimName") == "botfleet-server-data",
        "data_dir on its PVC",
    )
    for key in ("ca_file", "cert_file", "key_file"):
        file_of(server, objects, secrets, config["mqtt"][key])
    file_of(server, objects, secrets, config["auth"]["token_file"])
    service = one(objects, "Service", "botfleet-server")
    (svc_port,) = service["spec"]["ports"]
    check(
        port_number(ctr, svc_port["targetPort"]) == http_port and svc_port["port"] == http_port,
        "server Service port",
    )
    check(
        f"http://botfleet-server:{http_port}" in DAG.read_text(),
        "the DAG's AIRFLOW_CONN_BOTFLEET names the Service",
    )
    check(config["public_url"].endswith(f":{svc_port['nodePort']}"), "public_url: the Service's NodePort")

    # The broker: the server's mqtt.url, the Service, the listener, the files it names.
    broker = one(objects, "Deployment", "mosquitto")
    mctr = container(broker)
    broker_cm = by_prefix(objects, "ConfigMap", "mosquitto-config")
    conf = broker_cm["data"]["mosquitto.conf"]
    check(
        broker_cm["data"]["acl"] == (REPO / "deploy" / "mosquitto" / "acl").read_text(),
        "deploy/k3s/mosquitto/acl differs from deploy/mosquitto/acl",
    )
    listeners = re.findall(r"^listener (\d+)$", conf, flags=re.M)
    check(len(listeners) == 1, "mosquitto.conf: one listener")
    mqtt_port = int(listeners[0])
    check(port_number(mctr, "mqtts") == mqtt_port, "mosquitto: container port = listener")
    msvc = one(objects, "Service", "mosquitto")
    (mport,) = msvc["spec"]["ports"]
    check(port_number(mctr, mport["targetPort"]) == mqtt_port, "mosquitto Service targets the listener")
    check(
        config["mqtt"]["url"] == f"mqtts://mosquitto.ml.svc.cluster.local:{mport['port']}",
        "server mqtt.url: the mosquitto Service",
    )
    conf_config = mctr["args"][mctr["args"].index("-c") + 1]
    for path in [
        conf_config,
        *re.findall(r"^(?:cafile|certfile|keyfile|acl_file|persistence_location) (\S+)$", conf, flags=re.M),
    ]:
        file_of(broker, objects, secrets, path)
    for claim in ("mosquitto-data", "botfleet-server-data"):
        one(objects, "PersistentVolumeClaim", claim)
    print("consistency: DAG names, ports, probes, mounts, Secret keys and the ACL agree")
    return {
        "server": server,
        "broker": broker,
        "secrets": secrets,
        "config_path": config_path,
        "conf_path": conf_config,
    }


# -- 3. the pods' configuration, run -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        if ready():
            return
        time.sleep(0.1)
    raise CheckFailed(f"{what} not ready within {DEADLINE_S} s:\n{log.read_text()}")


def lay_out(deployment: dict, objects: list[dict], root: Path, secrets: dict, pki: Path) -> int:
    """The deployment's volumes at root + mountPath, as the kubelet makes them; returns the uid."""
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    uid, gid = security["runAsUser"], security["fsGroup"]
    as_root = os.geteuid() == 0
    for mount_path, volume in mounts(deployment):
        where = root / mount_path.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes] = {}
        if "configMap" in volume:
            cm = one(objects, "ConfigMap", volume["configMap"]["name"])
            files = {k: v.encode() for k, v in cm["data"].items()}
        elif "secret" in volume:
            keys = secrets[volume["secret"]["secretName"]]
            files = {k: (pki / source).read_bytes() for k, source in keys.items()}
        mode = volume.get("configMap", volume.get("secret", {})).get("defaultMode", 0o644)
        for name, content in files.items():
            (where / name).write_bytes(content)
            (where / name).chmod(mode)
            if as_root:
                os.chown(where / name, 0, gid)
        if not files:  # a volume the pod writes: group fsGroup, setgid
            where.chmod(0o2775)
            if as_root:
                os.chown(where, 0, gid)
    return uid


def rewrite_paths(text: str, deployment: dict, root: Path) -> str:
    """Every path under one of the mounts moved under ``root`` (one pass: a mount at /tmp
    must not move the already moved paths again)."""
    paths = "|".join(re.escape(path) for path, _ in mounts(deployment))
    pattern = rf"(?<![\w/])({paths})(?=[/\"\s]|$)"
    return re.sub(pattern, lambda m: str(root) + m.group(1), text, flags=re.M)


def as_user(uid: int) -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def http(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def run_pods(objects: list[dict], found: dict, server_bin: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    pki_dir = work / "readme"
    pki_dir.mkdir(exist_ok=True)
    # README.md's own commands: the certificates and the token file.
    for line in readme_lines():
        argv = shlex.split(line)
        if argv[0] == "deploy/mosquitto/mint-certs.sh":
            subprocess.run(
                [str(REPO / argv[0]), *argv[1:]], cwd=pki_dir, check=True, stdout=subprocess.DEVNULL
            )
        elif argv[0] == "printf" and argv[-2:] == [">", "tokens"]:
            subprocess.run(["bash", "-c", line], cwd=pki_dir, check=True)
    check((pki_dir / "tokens").exists(), "README.md: no command writes the tokens file")
    token = (pki_dir / "tokens").read_text().split()[2]
    secrets = found["secrets"]

    root = work / "root"
    root.mkdir(exist_ok=True)
    root.chmod(0o755)
    broker, server = found["broker"], found["server"]
    broker_uid = lay_out(broker, objects, root, secrets, pki_dir)
    server_uid = lay_out(server, objects, root, secrets, pki_dir)
    mqtt_port, http_port = free_port(), free_port()

    conf = root / found["conf_path"].lstrip("/")
    text = rewrite_paths(conf.read_text(), broker, root)
    text = re.sub(r"^listener \d+$", f"listener {mqtt_port} 127.0.0.1", text, flags=re.M)
    conf.write_text(text)
    toml = root / found["config_path"].lstrip("/")
    text = rewrite_paths(toml.read_text(), server, root)
    text = re.sub(r'^http_listen = ".*"$', f'http_listen = "127.0.0.1:{http_port}"', text, flags=re.M)
    text = re.sub(r'^public_url = ".*"$', f'public_url = "http://127.0.0.1:{http_port}"', text, flags=re.M)
    text = re.sub(r'^url = "mqtts://[^"]*"$', f'url = "mqtts://127.0.0.1:{mqtt_port}"', text, flags=re.M)
    toml.write_text(text)
    binary = root / "usr" / "local" / "bin" / "botfleet-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(server_bin, binary)
    binary.chmod(0o755)

    procs: list[subprocess.Popen] = []
    try:
        mlog = work / "mosquitto.log"
        with mlog.open("w") as out:
            procs.append(
                subprocess.Popen([*as_user(broker_uid), "mosquitto", "-c", str(conf)], stdout=out, stderr=out)
            )

        def mqtt_up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", mqtt_port)) == 0

        wait_for("mosquitto (deploy/k3s/mosquitto/mosquitto.conf)", mqtt_up, procs[0], mlog)
        slog = work / "server.log"
        env = {**os.environ, "RUST_LOG": "info"}
        with slog.open("w") as out:
            argv = [*as_user(server_uid), str(binary), "serve", "--config", str(toml)]
            procs.append(subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=root))
        base = f"http://127.0.0.1:{http_port}"
        wait_for(
            "botfleet-server (deploy/k3s/botfleet-server.toml)",
            lambda: http(f"{base}/healthz") == 200,
            procs[1],
            slog,
        )
        check(http(f"{base}/api/v1/models", token) == 200, "the README's airflow token is refused")
        check(http(f"{base}/api/v1/models") == 401, "a request without a token is answered")
        pubkey = subprocess.run(
            [*as_user(server_uid), str(binary), "pubkey", "--config", str(toml)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        check(pubkey.startswith("ed25519:"), f"pubkey --config (README.md's command): {pubkey!r}")

        # Through the ACL: a robot's report reaches the control plane's certificate.
        tls = [
            "-h",
            "127.0.0.1",
            "-p",
            str(mqtt_port),
            "--cafile",
            str(pki_dir / "pki" / "ca.crt"),
            "-V",
            "mqttv5",
        ]

        def client(cn: str) -> list[str]:
            return ["--cert", str(pki_dir / "pki" / f"{cn}.crt"), "--key", str(pki_dir / "pki" / f"{cn}.key")]

        topic = "botfleet/v1/devices/robot-001/status"
        sub = subprocess.Popen(
            ["mosquitto_sub", *tls, *client("botfleet-server"), "-t", "botfleet/v1/devices/+/status",
             "-C", "1", "-W", str(DEADLINE_S), "-F", "%t %p"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        publish = ["mosquitto_pub", *tls, *client("robot-001"), "-t", topic, "-q", "1", "-r"]
        subprocess.run([*publish, "-m", "k8s-check"], check=True)
        got, _ = sub.communicate(timeout=DEADLINE_S + 5)
        check(
            got.strip() == f"{topic} k8s-check",
            f"robot-001's status did not reach botfleet-server's subscription: {got!r}",
        )
        # Clear the retained message again (an empty retained payload deletes it).
        subprocess.run([*publish, "-n"], check=True)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    users = f" as uid {broker_uid} and {server_uid}" if os.geteuid() == 0 else ""
    print(
        f"pods: Mosquitto and botfleet-server ran on the rendered configuration{users}: mutual TLS, "
        "/healthz, token required, pubkey, a robot's report through the ACL"
    )


def main() -> int:
    rendered, server_bin, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    objects = [o for o in yaml.safe_load_all(rendered.read_text()) if o]
    try:
        validate_schemas(objects)
        dag = dag_strings()
        check_images(dag)
        found = check_consistency(objects, dag)
        run_pods(objects, found, server_bin, work)
    except CheckFailed as e:
        print(f"k8s-check: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"objects": len(objects), "kubernetes": [VERSIONS[0], VERSIONS[-1]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
