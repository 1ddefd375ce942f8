"""Structural checks of the deployment files under infra/ (nothing is applied to a cluster).

Every YAML file parses; each Kubernetes object has the fields its kind requires and its
references (selectors, volumes, Secrets, ConfigMaps, PVCs, Services) resolve to objects declared
in infra/; images are pinned; the RayCluster / RayJob specs are well-formed (head without CPUs,
worker groups within their bounds, GPU groups requesting GPUs); the job entrypoints run a
`jobs.<stage>` module with a config file and overrides that `pipeline.config.load_config` accepts;
the cluster-launcher and docker-compose files are consistent. The doors are shut: the MLflow
server runs MLflow's basic-auth app, every Ray cluster has token auth, nothing is exposed outside
the cluster (or, with compose, outside the machine), and credentials come from Secrets or the
environment by name, never as values in a manifest.
"""
import configparser
import importlib.util
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
APP_DIR = "/home/ray/aploss"  # where infra/docker/Dockerfile puts the project inside the image
SHARED_MOUNT = "/mnt/cluster_storage"
JOB_MODULES = {"prep", "train", "evaluate", "pipeline", "sweep"}
NAMESPACED_KINDS = {"Deployment", "StatefulSet", "Service", "Secret", "ConfigMap",
                    "PersistentVolumeClaim", "Job", "RayCluster", "RayJob"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", "<", ">>"}

FILES = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))


def _load(path: Path) -> list | yaml.YAMLError:
    """The file's documents, or the parse error (reported by the parse test, not at collection)."""
    try:
        with open(path) as handle:
            return [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    except yaml.YAMLError as error:
        return error


DOCS = {path: _load(path) for path in FILES}
OBJECTS = [(path, doc) for path, docs in DOCS.items() if isinstance(docs, list)
           for doc in docs if isinstance(doc, dict) and "kind" in doc]
COMPOSE_FILES = [path for path in FILES if path.name.startswith(("docker-compose", "compose"))]
LAUNCHER_FILES = [path for path in FILES if path.parent.name == "cluster-launcher"]
CONFIG_FILES = [path for path in FILES if path.parent.name == "configs"]


def _objects(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in OBJECTS if doc["kind"] == kind]


def _names(kind: str) -> set[str]:
    return {doc["metadata"]["name"] for _, doc in _objects(kind)}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _ids(pairs) -> list[str]:
    return [f"{_rel(path)}:{doc['kind']}/{doc['metadata']['name']}" for path, doc in pairs]


def _pinned(image: str) -> bool:
    """A tag (not `latest`) or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and bool(tag) and "latest" not in tag


def _secret_keys() -> dict[str, set[str]]:
    return {doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
            for _, doc in _objects("Secret")}


def _configmap_keys() -> dict[str, set[str]]:
    return {doc["metadata"]["name"]: set(doc.get("data", {})) for _, doc in _objects("ConfigMap")}


# Names of settings that hold credentials: they come from Secrets or the environment, by name.
SECRET_LIKE = re.compile("PASSWORD|SECRET|KEY|TOKEN")


# ----------------------------------------------------------------------------- pod templates

def _ray_cluster_templates(spec: dict, where: str) -> list[tuple[str, dict]]:
    templates = [(f"{where} head", spec["headGroupSpec"]["template"])]
    templates += [(f"{where} {group['groupName']}", group["template"]) for group in spec.get("workerGroupSpecs", [])]
    return templates


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in WORKLOAD_KINDS:
        return [(where, doc["spec"]["template"])]
    if doc["kind"] == "RayCluster":
        return _ray_cluster_templates(doc["spec"], where)
    if doc["kind"] == "RayJob":
        templates = _ray_cluster_templates(doc["spec"]["rayClusterSpec"], where)
        if "submitterPodTemplate" in doc["spec"]:
            templates.append((f"{where} submitter", doc["spec"]["submitterPodTemplate"]))
        return templates
    return []


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _env_names(container: dict) -> set[str]:
    """Variables a container gets from `env` and from ConfigMaps in `envFrom`."""
    names = {entry["name"] for entry in container.get("env", [])}
    configmaps = _configmap_keys()
    secrets = _secret_keys()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= configmaps.get(source["configMapRef"]["name"], set())
        if "secretRef" in source:
            names |= secrets.get(source["secretRef"]["name"], set())
    return names


def _check_pod_template(template: dict, where: str, claim_templates: set[str] = frozenset()) -> None:
    spec = template.get("spec")
    assert isinstance(spec, dict) and spec.get("containers"), f"{where}: template.spec.containers is empty"
    volumes = {volume["name"] for volume in spec.get("volumes", [])} | set(claim_templates)
    claims = _names("PersistentVolumeClaim")
    for volume in spec.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"{where}: volume {volume['name']!r} claims undeclared PVC {claim!r}"
        if "secret" in volume:
            assert volume["secret"]["secretName"] in _names("Secret"), f"{where}: undeclared Secret volume"
        if "configMap" in volume:
            assert volume["configMap"]["name"] in _names("ConfigMap"), f"{where}: undeclared ConfigMap volume"
    secrets, configmaps = _secret_keys(), _configmap_keys()
    for container in _containers(template):
        name = container.get("name")
        assert name, f"{where}: a container has no name"
        image = container.get("image")
        assert image, f"{where}/{name}: no image"
        assert _pinned(image), f"{where}/{name}: image {image!r} is not pinned to a tag or digest"
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}/{name}: volumeMount {mount['name']!r} names no declared volume"
        for entry in container.get("env", []):
            source = entry.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                assert ref["name"] in secrets, f"{where}/{name}: env {entry['name']} refers to undeclared Secret {ref['name']!r}"
                assert ref["key"] in secrets[ref["name"]], f"{where}/{name}: Secret {ref['name']!r} has no key {ref['key']!r}"
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["name"] in configmaps, f"{where}/{name}: undeclared ConfigMap {ref['name']!r}"
                assert ref["key"] in configmaps[ref["name"]], f"{where}/{name}: ConfigMap {ref['name']!r} has no key {ref['key']!r}"
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, f"{where}/{name}: envFrom undeclared Secret"
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps, f"{where}/{name}: envFrom undeclared ConfigMap"


# ----------------------------------------------------------------------------- every file / object

def test_infra_has_the_expected_files():
    expected = ["namespace.yaml", "kuberay/raycluster.yaml", "kuberay/storage.yaml", "kuberay/env.yaml",
                "kuberay/rayjob-pipeline.yaml", "kuberay/rayjob-sweep.yaml", "cluster-launcher/aws.yaml",
                "mlflow/mlflow.yaml", "mlflow/secrets.example.yaml", "mlflow/docker-compose.yaml",
                "configs/cluster-gpu.yaml", "docker/Dockerfile", "README.md"]
    missing = [name for name in expected if not (INFRA / name).is_file()]
    assert not missing, f"missing under infra/: {missing}"


@pytest.mark.parametrize("path", FILES, ids=[_rel(p) for p in FILES])
def test_every_yaml_file_parses_into_known_documents(path):
    docs = DOCS[path]
    assert not isinstance(docs, yaml.YAMLError), f"{_rel(path)}: not valid YAML: {docs}"
    assert docs, f"{_rel(path)}: empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: a document is not a mapping"
    kinds = {"k8s" if "kind" in doc else "other" for doc in docs}
    if path in COMPOSE_FILES or path in LAUNCHER_FILES or path in CONFIG_FILES:
        assert kinds == {"other"}, f"{_rel(path)}: unexpected Kubernetes objects"
    else:
        assert kinds == {"k8s"}, f"{_rel(path)}: documents without a kind"


@pytest.mark.parametrize("path,doc", OBJECTS, ids=_ids(OBJECTS))
def test_kubernetes_objects_have_api_version_kind_and_name(path, doc):
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], "apiVersion missing"
    assert isinstance(doc.get("kind"), str) and doc["kind"], "kind missing"
    name = doc.get("metadata", {}).get("name")
    assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name), f"bad metadata.name {name!r}"
    expected_api = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "Job": "batch/v1", "Service": "v1",
                    "Secret": "v1", "ConfigMap": "v1", "PersistentVolumeClaim": "v1", "Namespace": "v1",
                    "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1"}
    assert doc["kind"] in expected_api, f"unexpected kind {doc['kind']}"
    assert doc["apiVersion"] == expected_api[doc["kind"]]


def test_objects_are_unique_and_in_the_declared_namespace():
    namespaces = _names("Namespace")
    assert namespaces, "no Namespace declared"
    seen = set()
    for path, doc in OBJECTS:
        key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"{_rel(path)}: {key} declared twice"
        seen.add(key)
        if doc["kind"] in NAMESPACED_KINDS:
            assert doc["metadata"].get("namespace") in namespaces, \
                f"{_rel(path)}: {doc['kind']}/{doc['metadata']['name']} is not in a declared namespace"


WORKLOADS = [(p, d) for p, d in OBJECTS if d["kind"] in WORKLOAD_KINDS | {"RayCluster", "RayJob"}]


@pytest.mark.parametrize("path,doc", WORKLOADS, ids=_ids(WORKLOADS))
def test_pod_templates_are_complete_and_their_references_resolve(path, doc):
    claim_templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])} \
        if doc["kind"] == "StatefulSet" else set()
    for where, template in _pod_templates(doc):
        _check_pod_template(template, where, claim_templates)


SETS = [(p, d) for p, d in OBJECTS if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("path,doc", SETS, ids=_ids(SETS))
def test_selectors_match_their_pod_templates(path, doc):
    match = doc["spec"]["selector"]["matchLabels"]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    assert match and match.items() <= labels.items(), f"selector {match} not within template labels {labels}"
    if doc["kind"] == "StatefulSet":
        assert doc["spec"]["serviceName"] in _names("Service")


def test_jobs_have_a_restart_policy_kubernetes_accepts():
    for path, doc in _objects("Job"):
        assert doc["spec"]["template"]["spec"].get("restartPolicy") in ("Never", "OnFailure"), _rel(path)


SERVICES = _objects("Service")


@pytest.mark.parametrize("path,doc", SERVICES, ids=_ids(SERVICES))
def test_services_select_a_workload_and_target_its_ports(path, doc):
    selector = doc["spec"]["selector"]
    assert selector, "a Service without a selector"
    targets = [d["spec"]["template"] for _, d in SETS
               if d["metadata"].get("namespace") == doc["metadata"].get("namespace")
               and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert targets, f"selector {selector} matches no Deployment/StatefulSet"
    ports = [port for template in targets for c in template["spec"]["containers"] for port in c.get("ports", [])]
    for port in doc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert any(target in (p.get("name"), p["containerPort"]) for p in ports), \
            f"targetPort {target!r} is no container port of the selected pods"


def test_secrets_are_placeholders_only():
    for path, doc in _objects("Secret"):
        assert "example" in path.name, f"{_rel(path)}: Secrets belong in *.example.yaml files only"
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        for key, value in values.items():
            if SECRET_LIKE.search(key):
                assert "CHANGE-ME" in str(value), f"{_rel(path)}: {key} does not look like a placeholder"


# ----------------------------------------------------------------------------- doors shut

_K8S_REF = re.compile(r"\$\((\w+)\)")
_URI_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def test_credentials_come_from_secrets_by_name():
    for path, doc in WORKLOADS:
        for where, template in _pod_templates(doc):
            for container in _containers(template):
                at = f"{_rel(path)}: {where}/{container['name']}"
                env = container.get("env", [])
                for entry in env:
                    if SECRET_LIKE.search(entry["name"]):
                        assert "secretKeyRef" in entry.get("valueFrom", {}), \
                            f"{at}: {entry['name']} must come from a Secret (secretKeyRef), not a value"
                # A $(VAR) reference would copy a credential into a plain variable or onto a
                # command line, where `kubectl describe` and process listings show it.
                texts = [e.get("value", "") for e in env] + container.get("command", []) + container.get("args", [])
                copied = [name for text in texts for name in _K8S_REF.findall(text) if SECRET_LIKE.search(name)]
                assert not copied, f"{at}: {copied} expanded into a value or a command line"
    for path, doc in _objects("ConfigMap"):
        for key, value in doc.get("data", {}).items():
            assert not SECRET_LIKE.search(key), f"{_rel(path)}: {key} belongs in a Secret, not a ConfigMap"
            assert not _URI_WITH_PASSWORD.search(value), f"{_rel(path)}: {key} holds a URI with a password"


def test_nothing_is_exposed_outside_the_cluster():
    exposing = {"Ingress", "IngressRoute", "Route", "Gateway", "HTTPRoute"}
    assert not [doc for _, doc in OBJECTS if doc["kind"] in exposing], "an Ingress/Route exposes a service"
    for path, doc in SERVICES:
        assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", \
            f"{_rel(path)}: Service/{doc['metadata']['name']} is reachable from outside the cluster"
        assert not doc["spec"].get("externalIPs"), f"{_rel(path)}: Service/{doc['metadata']['name']} has externalIPs"
    for path, doc in WORKLOADS:
        for where, template in _pod_templates(doc):
            assert not template["spec"].get("hostNetwork"), f"{_rel(path)}: {where} uses the node's network"
            for container in _containers(template):
                assert not any("hostPort" in port for port in container.get("ports", [])), \
                    f"{_rel(path)}: {where}/{container['name']} publishes a port on the node"


def _auth_config(text: str, where: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    config = parser["mlflow"]
    # Anonymous requests are refused whatever this is; it is what a logged-in user may do with
    # what others created, and writing must not be part of it.
    assert config["default_permission"] in ("READ", "NO_PERMISSIONS"), \
        f"{where}: default_permission {config['default_permission']} lets any account change others' runs"
    database = urlparse(config["database_uri"])
    assert database.scheme.startswith("postgresql"), f"{where}: users must live in PostgreSQL, not {database.scheme}"
    assert database.password is None, f"{where}: the database password belongs in the environment (PGPASSWORD)"
    assert "admin_password" not in config, f"{where}: the admin's password belongs in a Secret"
    assert config.get("authorization_function", "mlflow.server.auth:authenticate_request_basic_auth") \
        == "mlflow.server.auth:authenticate_request_basic_auth"
    return config


def _env_entry(container: dict, name: str) -> dict:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name] or [{}]
    return entry


def _mlflow_server() -> dict:
    (_, server), = [(p, d) for p, d in _objects("Deployment") if d["metadata"]["name"] == "mlflow"]
    return server["spec"]["template"]["spec"]


def _kubernetes_auth_config() -> configparser.SectionProxy:
    pod = _mlflow_server()
    container = pod["containers"][0]
    path = Path(_env_entry(container, "MLFLOW_AUTH_CONFIG_PATH").get("value", ""))
    (mount,) = [m for m in container.get("volumeMounts", []) if Path(m["mountPath"]) == path.parent] or [None]
    assert mount, f"MLFLOW_AUTH_CONFIG_PATH {str(path)!r} is on no mounted volume"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (_, configmap), = [(p, d) for p, d in _objects("ConfigMap") if d["metadata"]["name"] == volume["configMap"]["name"]]
    return _auth_config(configmap["data"][path.name], f"ConfigMap/{configmap['metadata']['name']}")


def test_the_mlflow_server_requires_a_login():
    container = _mlflow_server()["containers"][0]
    args = " ".join(container["command"] + container["args"])
    assert re.search(r"--app-name[= ]basic-auth\b", args), "the MLflow server runs without authentication"
    config = _kubernetes_auth_config()
    backend = urlparse(next(a.partition("=")[2] for a in container["args"] if a.startswith("--backend-store-uri=")))
    assert urlparse(config["database_uri"]).hostname == backend.hostname, \
        "the users must live on the deployed PostgreSQL, beside the runs"
    assert backend.password is None, "the database password would be on the server's command line"
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                 "PGUSER", "PGPASSWORD", "PGDATABASE"):
        assert "secretKeyRef" in _env_entry(container, name).get("valueFrom", {}), f"{name} must come from a Secret"


def _secret_ref(container: dict, name: str) -> tuple[str, str]:
    ref = _env_entry(container, name).get("valueFrom", {}).get("secretKeyRef", {})
    return ref.get("name"), ref.get("key")


def test_the_jobs_account_job_creates_the_account_the_ray_pods_use():
    (_, job), = [(p, d) for p, d in _objects("Job") if d["metadata"]["name"] == "mlflow-jobs-account"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    server = _mlflow_server()["containers"][0]
    assert _secret_ref(container, "MLFLOW_TRACKING_USERNAME") == _secret_ref(server, "MLFLOW_AUTH_ADMIN_USERNAME")
    assert _secret_ref(container, "MLFLOW_TRACKING_PASSWORD") == _secret_ref(server, "MLFLOW_AUTH_ADMIN_PASSWORD")
    account = {_secret_ref(container, "ACCOUNT_USERNAME"), _secret_ref(container, "ACCOUNT_PASSWORD")}
    for _, doc in _objects("RayCluster") + _objects("RayJob"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        for where, template in _ray_cluster_templates(spec, f"{doc['kind']}/{doc['metadata']['name']}"):
            ray = template["spec"]["containers"][0]
            used = {_secret_ref(ray, "MLFLOW_TRACKING_USERNAME"), _secret_ref(ray, "MLFLOW_TRACKING_PASSWORD")}
            assert used == account, f"{where}: logs to MLflow as {used}, the Job creates {account}"


def _compose_interpolation(value) -> re.Match | None:
    """`${NAME:?message}`: a value compose takes from the environment and refuses to run without."""
    return re.fullmatch(r"\$\{(\w+):?\?[^}]*\}", str(value))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=[_rel(p) for p in COMPOSE_FILES])
def test_compose_keeps_its_doors_shut(path):
    (doc,) = DOCS[path]
    for name, service in doc["services"].items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for variable, value in environment.items():
            if SECRET_LIKE.search(variable):
                assert _compose_interpolation(value), \
                    f"{name}: {variable} must be a required variable of the environment, not {value!r}"
        commands = [service.get(key) or [] for key in ("command", "entrypoint")]
        text = " ".join(c if isinstance(c, str) else " ".join(c) for c in commands)
        # ${VAR} is filled in by compose (a secret would then show in `docker inspect`); $${VAR}
        # is left to the container's shell, which reads it from the container's environment.
        baked = [v for v in re.findall(r"(?<!\$)\$\{(\w+)", text) if SECRET_LIKE.search(v)]
        assert not baked, f"{name}: {baked} written into the command line"
        for port in service.get("ports", []):
            bound = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert bound == "127.0.0.1", f"{name}: port {port} is published beyond this machine"

    mlflow = doc["services"]["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"], "the MLflow server runs without authentication"
    (mount,) = [c for c in mlflow.get("configs", []) if c["target"] == mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]]
    config = _auth_config(doc["configs"][mount["source"]]["content"], f"{_rel(path)}: configs/{mount['source']}")
    assert urlparse(config["database_uri"]).hostname in doc["services"], "the users must live on the stack's PostgreSQL"
    kubernetes = _kubernetes_auth_config()
    assert {k: v for k, v in config.items() if k != "database_uri"} == \
        {k: v for k, v in kubernetes.items() if k != "database_uri"}, "compose and Kubernetes differ in their auth settings"


def test_the_shared_volume_is_read_write_many():
    claims = {doc["metadata"]["name"]: doc for _, doc in _objects("PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims["aploss-shared"]["spec"]["accessModes"]


# ----------------------------------------------------------------------------- Ray on Kubernetes

def _ray_version_of_image() -> str:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    match = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py\d+", text, re.M)
    assert match, "infra/docker/Dockerfile: no pinned ARG RAY_IMAGE=rayproject/ray:X.Y.Z-pyNN"
    return match.group(1)


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec.get("rayVersion") == _ray_version_of_image(), f"{where}: rayVersion differs from the image's Ray"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth is off"
    assert spec["headGroupSpec"].get("serviceType") == "ClusterIP", \
        f"{where}: the dashboard and job API must stay inside the cluster (head serviceType ClusterIP)"
    assert not spec["headGroupSpec"].get("enableIngress"), f"{where}: an Ingress exposes the dashboard"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert isinstance(params, dict)
    assert params.get("dashboard-host") == "0.0.0.0", f"{where}: dashboard not reachable from outside the pod"
    assert str(params.get("num-cpus")) == "0", f"{where}: the head must not run training (num-cpus 0)"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container.get("image") and head_container.get("name"), f"{where}: head container needs image and name"
    assert {p["containerPort"] for p in head_container.get("ports", [])} >= {6379, 8265, 10001}
    assert _gpus(head_container) == 0, f"{where}: the head is CPU only"
    groups = spec.get("workerGroupSpecs", [])
    assert groups, f"{where}: no worker groups"
    assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: duplicate groupName"
    for group in groups:
        name = group.get("groupName")
        assert name, f"{where}: a worker group has no groupName"
        low, high, replicas = group.get("minReplicas", 0), group["maxReplicas"], group.get("replicas", 0)
        assert 0 <= low <= replicas <= high, f"{where}/{name}: replicas {replicas} not in [{low}, {high}]"
        assert isinstance(group.get("rayStartParams", {}), dict)
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("image") and c.get("name") for c in containers), f"{where}/{name}"
        if "gpu" in name:
            gpu = _gpus(containers[0])
            assert gpu >= 1, f"{where}/{name}: the GPU group requests no nvidia.com/gpu"
            requests = containers[0]["resources"].get("requests", {})
            assert int(requests.get("nvidia.com/gpu", gpu)) == gpu, f"{where}/{name}: GPU requests != limits"
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{where}/{name}: no GPU toleration"
            assert containers[0]["image"].endswith("-gpu"), f"{where}/{name}: GPU pods need the CUDA image"
    assert any("gpu" in g["groupName"] for g in groups), f"{where}: no GPU worker group"
    for template_where, template in _ray_cluster_templates(spec, where):
        mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert SHARED_MOUNT in mounts, f"{template_where}: shared storage not mounted at {SHARED_MOUNT}"
        env = _env_names(template["spec"]["containers"][0])
        assert {"MLFLOW_TRACKING_URI", "APLOSS_DATA_ROOT"} <= env, f"{template_where}: tracking / data settings missing"
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            source = _env_entry(template["spec"]["containers"][0], name).get("valueFrom", {})
            assert "secretKeyRef" in source and not source["secretKeyRef"].get("optional"), \
                f"{template_where}: {name} must come from a Secret the pod cannot start without"


RAY_CLUSTERS = _objects("RayCluster")
RAY_JOBS = _objects("RayJob")


@pytest.mark.parametrize("path,doc", RAY_CLUSTERS, ids=_ids(RAY_CLUSTERS))
def test_raycluster_spec(path, doc):
    _check_ray_cluster_spec(doc["spec"], f"RayCluster/{doc['metadata']['name']}")


_ENV_REF = re.compile(r"\$\{(\w+)[^}]*\}|\$(\w+)")


def _entrypoint(doc: dict) -> tuple[str, str | None, list[str], set[str]]:
    """(jobs module, --config path, key=value overrides with env refs replaced, env vars used)."""
    text = doc["spec"]["entrypoint"]
    tokens = shlex.split(text)
    assert not SHELL_OPERATORS & set(tokens), \
        "shell operators in the entrypoint would be run by the submitter's shell, not by the job"
    assert tokens[:2] == ["python", "-m"] and tokens[2].startswith("jobs."), \
        f"entrypoint must start with `python -m jobs.<stage>`: {text!r}"
    module = tokens[2].removeprefix("jobs.")
    config, overrides, used = None, [], set()
    rest = iter(tokens[3:])
    for token in rest:
        if token == "--config":
            config = next(rest)
        elif token.startswith("--config="):
            config = token.partition("=")[2]
        elif not token.startswith("-") and "=" in token:
            names = {a or b for a, b in _ENV_REF.findall(token)}
            used |= names
            overrides.append(_ENV_REF.sub(lambda m: f"dummy-{(m.group(1) or m.group(2)).lower()}", token))
    return module, config, overrides, used


def _repo_path(config: str) -> Path:
    """A config path as the job sees it -> the file in this repository."""
    if config.startswith(APP_DIR + "/"):
        return ROOT / config[len(APP_DIR) + 1:]
    assert not config.startswith("/"), f"--config {config!r} is outside the project"
    return ROOT / config


@pytest.fixture(scope="module")
def load_config():
    from pipeline.config import load_config

    return load_config


@pytest.mark.parametrize("path,doc", RAY_JOBS, ids=_ids(RAY_JOBS))
def test_rayjob_spec(path, doc, load_config):
    spec = doc["spec"]
    where = f"RayJob/{doc['metadata']['name']}"
    module, config_path, overrides, used = _entrypoint(doc)
    assert module in JOB_MODULES, f"{where}: jobs.{module} is not one of {sorted(JOB_MODULES)}"
    if (ROOT / "jobs").is_dir():
        assert (ROOT / "jobs" / f"{module}.py").is_file(), f"{where}: jobs/{module}.py does not exist"
    assert config_path, f"{where}: no --config"
    assert _repo_path(config_path).is_file(), f"{where}: config {config_path} is not in the repository"
    config = load_config(_repo_path(config_path), overrides)
    assert config.ray.address == "auto", f"{where}: a job must join its cluster (ray.address=auto)"
    assert config.tracking.uri, f"{where}: tracking.uri must be set (sqlite is unsafe across nodes)"
    assert config.run.output_dir.startswith(SHARED_MOUNT), f"{where}: run.output_dir must be on shared storage"
    assert config.ray.use_gpu, f"{where}: the cluster jobs train on GPUs"

    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML is not a mapping"
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0

    cluster = spec["rayClusterSpec"]
    _check_ray_cluster_spec(cluster, where)
    # Enough GPUs and CPUs for the worker group the entrypoint asks for.
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if "gpu" in g["groupName"]]
    capacity = sum(g["maxReplicas"] * _gpus(g["template"]["spec"]["containers"][0]) for g in gpu_groups)
    assert capacity >= config.ray.workers, f"{where}: {config.ray.workers} GPU workers, room for {capacity}"
    for group in gpu_groups:
        cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        assert config.ray.cpus_per_worker <= cpus, f"{where}/{group['groupName']}: ray.cpus_per_worker > pod CPUs"

    # The variables the entrypoint expands exist where it is expanded: in K8sJobMode the
    # submitter's shell, on the head otherwise.
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert used <= _env_names(head), f"{where}: head lacks {used - _env_names(head)}"
    if spec["submissionMode"] == "K8sJobMode":
        submitter = spec.get("submitterPodTemplate")
        assert submitter, f"{where}: the default submitter pod has none of {sorted(used)}; give it a template"
        assert submitter["spec"].get("restartPolicy") == "Never"
        env = _env_names(submitter["spec"]["containers"][0])
        assert used <= env, f"{where}: the submitter pod lacks {used - env}"


def test_dockerfile_puts_the_project_where_the_jobs_expect_it():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(APP_DIR)}$", text, re.M)
    assert re.search(rf"PYTHONPATH={re.escape(APP_DIR)}", text), "jobs/ is not installed: it needs PYTHONPATH"
    for folder in ("aploss", "pipeline", "jobs", "infra/configs"):
        assert re.search(rf"^COPY .*\b{re.escape(folder)}\b", text, re.M), f"Dockerfile does not copy {folder}/"


def test_tracking_uri_points_at_the_mlflow_service():
    (_, configmap), = [(p, d) for p, d in _objects("ConfigMap") if d["metadata"]["name"] == "aploss-env"]
    uri = urlparse(configmap["data"]["MLFLOW_TRACKING_URI"])
    assert uri.scheme == "http"
    assert uri.username is None and uri.password is None, "credentials belong in MLFLOW_TRACKING_USERNAME/PASSWORD"
    service_name, namespace, *_ = uri.hostname.split(".")
    (_, service), = [(p, d) for p, d in SERVICES if d["metadata"]["name"] == service_name]
    assert service["metadata"]["namespace"] == namespace
    assert uri.port in {p["port"] for p in service["spec"]["ports"]}
    (_, server), = [(p, d) for p, d in _objects("Deployment") if d["metadata"]["name"] == service_name]
    args = server["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a.partition("=")[2] for a in args if a.startswith("--allowed-hosts="))
    assert f"{uri.hostname}:{uri.port}" in allowed.split(","), "MLflow would reject the in-cluster Host header"
    assert "--serve-artifacts" in args
    assert any(a.startswith("--backend-store-uri=postgresql") for a in args)
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)


# ----------------------------------------------------------------------------- configs, launcher, compose

@pytest.mark.parametrize("path", CONFIG_FILES, ids=[_rel(p) for p in CONFIG_FILES])
def test_infra_configs_load(path, load_config):
    config = load_config(path)
    assert config.train.batch_size % config.ray.workers == 0


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=[_rel(p) for p in LAUNCHER_FILES])
def test_cluster_launcher_config(path):
    (doc,) = DOCS[path]
    assert doc.get("cluster_name")
    assert doc["provider"]["type"] in ("aws", "gcp", "azure", "kuberay", "local")
    if doc["provider"]["type"] in ("aws", "gcp"):
        assert doc["provider"].get("region")
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types, "head_node_type is not an available node type"
    total = doc["max_workers"]
    for name, node in types.items():
        if name == doc["head_node_type"]:
            assert node.get("resources", {}).get("CPU") == 0, "the head must not run training (CPU 0)"
            continue
        low, high = node.get("min_workers", 0), node["max_workers"]
        assert 0 <= low <= high <= total, f"{name}: min/max workers {low}/{high} vs max_workers {total}"
        assert node["node_config"].get("InstanceType") or node["node_config"].get("machineType")
    assert doc.get("idle_timeout_minutes", 0) > 0
    assert doc.get("setup_commands"), "nothing installs the project"
    # Ray's own JSON schema of cluster-launcher configs (shipped with ray).
    jsonschema = pytest.importorskip("jsonschema")
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    jsonschema.validate(doc, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))
    images = [doc["docker"][key] for key in ("image", "head_image", "worker_image") if key in doc["docker"]]
    assert images and all(_pinned(image) for image in images)
    assert all(f":{_ray_version_of_image()}-" in image for image in images), "Ray version differs from the image's"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=[_rel(p) for p in LAUNCHER_FILES])
def test_cluster_launcher_keeps_ray_private(path):
    (doc,) = DOCS[path]
    # Ray's own security group opens SSH and the cluster's internal ports only; extra rules must
    # not open anything else (the dashboard, say) to the world.
    for rule in doc["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        assert not {"0.0.0.0/0", "::/0"} & set(ranges), f"security group rule {rule} is open to the world"
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in doc[key] if "ray start" in c]
    assert starts
    mounted = set(doc.get("file_mounts", {}))
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command, f"`{command}` starts Ray without token auth"
        # The MLflow account reaches drivers and workers through the environment of `ray start`.
        sourced = re.findall(r"(?:^|&&|;)\s*(?:\.|source)\s+(\S+)", command)
        assert any(f.replace("~", "/home/ray", 1) in mounted for f in sourced), \
            f"`{command}` loads no credentials file synced by file_mounts"
    for key in ("initialization_commands", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in doc.get(key, []):
            literal = [m for m in re.findall(r"(\w+)=([^\s$]\S*)", command) if SECRET_LIKE.search(m[0])]
            assert not literal, f"{key}: credentials written into the config: {[name for name, _ in literal]}"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=[_rel(p) for p in COMPOSE_FILES])
def test_docker_compose(path):
    (doc,) = DOCS[path]
    services = doc["services"]
    for name, service in services.items():
        assert service.get("image"), f"{name}: no image"
        assert _pinned(service["image"]), f"{name}: image {service['image']!r} not pinned"
        depends = service.get("depends_on", {})
        assert set(depends) <= set(services), f"{name}: depends on unknown services"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in doc.get("volumes", {}), f"{name}: named volume {source!r} not declared"
    command = " ".join(services["mlflow"]["command"])
    for flag in ("--backend-store-uri=postgresql", "--artifacts-destination=s3://", "--serve-artifacts",
                 "--host=0.0.0.0", "--allowed-hosts="):
        assert flag in command, f"mlflow command lacks {flag}"


def test_images_of_the_tracking_stack_match_across_kubernetes_and_compose():
    (compose,) = DOCS[INFRA / "mlflow" / "docker-compose.yaml"]
    compose_images = {service["image"] for service in compose["services"].values()}
    k8s_images = {c["image"] for path, doc in OBJECTS if path.parent.name == "mlflow"
                  for _, template in _pod_templates(doc) for c in _containers(template)}
    assert compose_images == k8s_images
    assert any(image.startswith("ghcr.io/mlflow/mlflow:v3.") for image in k8s_images)


def test_readme_covers_every_infra_file():
    text = (INFRA / "README.md").read_text()
    for path in FILES:
        assert str(path.relative_to(INFRA)) in text, f"infra/README.md does not mention {path.relative_to(INFRA)}"


def test_readme_says_how_to_reach_the_services():
    text = (INFRA / "README.md").read_text()
    for needed in ("port-forward svc/mlflow", "port-forward svc/aploss-head-svc", "RAY_AUTH_MODE=token",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "--app-name=basic-auth"):
        assert needed in text, f"infra/README.md does not say {needed!r}"
