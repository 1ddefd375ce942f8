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

Hardening (infra/README.md, Hardening): every pod meets the "restricted" Pod Security Standard
with a read-only root filesystem and no ServiceAccount token; the NetworkPolicies, evaluated here
against every pod's labels, admit exactly the peers of the README's table; each Secret reaches
only the pods that need it, as files; images are pinned by digest in infra/kustomization.yaml
(and the same digests in compose, the Dockerfile and the launcher); the image installs a
hash-locked dependency set; nothing is made world-writable; the launcher's SSH is not open to
the world and it never executes its credentials file. A `checkov` on PATH also gets its say.
"""
import configparser
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
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
                    "PersistentVolumeClaim", "Job", "RayCluster", "RayJob", "NetworkPolicy",
                    "ServiceAccount"}
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
KUSTOMIZATION = INFRA / "kustomization.yaml"
# kustomize's build file is not an object of the cluster.
OBJECTS = [(path, doc) for path, docs in DOCS.items() if isinstance(docs, list) and path != KUSTOMIZATION
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
                assert ref["name"] in secrets, \
                    f"{where}/{name}: env {entry['name']} refers to undeclared Secret {ref['name']!r}"
                assert ref["key"] in secrets[ref["name"]], \
                    f"{where}/{name}: Secret {ref['name']!r} has no key {ref['key']!r}"
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["name"] in configmaps, f"{where}/{name}: undeclared ConfigMap {ref['name']!r}"
                assert ref["key"] in configmaps[ref["name"]], \
                    f"{where}/{name}: ConfigMap {ref['name']!r} has no key {ref['key']!r}"
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, f"{where}/{name}: envFrom undeclared Secret"
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps, f"{where}/{name}: envFrom undeclared ConfigMap"


# ----------------------------------------------------------------------------- every file / object

def test_infra_has_the_expected_files():
    expected = ["namespace.yaml", "networkpolicy.yaml", "kustomization.yaml", "kuberay/raycluster.yaml",
                "kuberay/storage.yaml", "kuberay/env.yaml", "kuberay/rayjob-pipeline.yaml",
                "kuberay/rayjob-sweep.yaml", "cluster-launcher/aws.yaml", "mlflow/mlflow.yaml",
                "mlflow/secrets.example.yaml", "mlflow/docker-compose.yaml", "configs/cluster-gpu.yaml",
                "docker/Dockerfile", "docker/requirements.lock", "README.md"]
    missing = [name for name in expected if not (INFRA / name).is_file()]
    assert not missing, f"missing under infra/: {missing}"


@pytest.mark.parametrize("path", FILES, ids=[_rel(p) for p in FILES])
def test_every_yaml_file_parses_into_known_documents(path):
    docs = DOCS[path]
    assert not isinstance(docs, yaml.YAMLError), f"{_rel(path)}: not valid YAML: {docs}"
    assert docs, f"{_rel(path)}: empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: a document is not a mapping"
    kinds = {"k8s" if "kind" in doc and path != KUSTOMIZATION else "other" for doc in docs}
    if path in COMPOSE_FILES or path in LAUNCHER_FILES or path in CONFIG_FILES or path == KUSTOMIZATION:
        assert kinds == {"other"}, f"{_rel(path)}: unexpected Kubernetes objects"
    else:
        assert kinds == {"k8s"}, f"{_rel(path)}: documents without a kind"


@pytest.mark.parametrize("path,doc", OBJECTS, ids=_ids(OBJECTS))
def test_kubernetes_objects_have_api_version_kind_and_name(path, doc):
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], "apiVersion missing"
    assert isinstance(doc.get("kind"), str) and doc["kind"], "kind missing"
    name = doc.get("metadata", {}).get("name")
    assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name), \
        f"bad metadata.name {name!r}"
    expected_api = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "Job": "batch/v1", "Service": "v1",
                    "Secret": "v1", "ConfigMap": "v1", "PersistentVolumeClaim": "v1", "Namespace": "v1",
                    "ServiceAccount": "v1", "NetworkPolicy": "networking.k8s.io/v1",
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
            # Credentials files (INI): each secret-looking setting inside them as well.
            for setting, equals, setting_value in (line.partition("=") for line in str(value).splitlines()):
                if equals and SECRET_LIKE.search(setting.upper()):
                    assert "CHANGE-ME" in setting_value, f"{_rel(path)}: {key}: {setting.strip()} is no placeholder"


# ----------------------------------------------------------------------------- doors shut

_K8S_REF = re.compile(r"\$\((\w+)\)")
_URI_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def _secret_mount_paths(template: dict, container: dict) -> list[str]:
    secret_volumes = {v["name"] for v in template["spec"].get("volumes", []) if "secret" in v}
    return [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in secret_volumes]


def test_credentials_come_from_secrets_by_name():
    for path, doc in WORKLOADS:
        for where, template in _pod_templates(doc):
            for container in _containers(template):
                at = f"{_rel(path)}: {where}/{container['name']}"
                env = container.get("env", [])
                for entry in env:
                    if entry["name"].endswith("_FILE") and "value" in entry:
                        # A program's *_FILE variable names a file of a mounted Secret.
                        assert any(entry["value"].startswith(mount.rstrip("/") + "/")
                                   for mount in _secret_mount_paths(template, container)), \
                            f"{at}: {entry['name']}={entry['value']} is on no mounted Secret"
                    elif SECRET_LIKE.search(entry["name"]):
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


def _secret_file(spec: dict, container: dict, path: str) -> tuple[str, str, bool] | None:
    """(Secret, key, optional) of the file a container sees at `path`, if a Secret volume holds it."""
    volumes = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
    for mount in container.get("volumeMounts", []):
        if mount["name"] in volumes and path.startswith(mount["mountPath"].rstrip("/") + "/"):
            source, name = volumes[mount["name"]], path[len(mount["mountPath"].rstrip("/")) + 1:]
            items = {item["path"]: item["key"] for item in source.get("items", [])}
            if items and name not in items:
                return None
            return source["secretName"], items.get(name, name), bool(source.get("optional"))
    return None


RAY_HOME = "/home/ray"  # the home of the image's user `ray`
MLFLOW_CREDENTIALS = f"{RAY_HOME}/.mlflow/credentials"  # MLflow's client reads ~/.mlflow/credentials
AWS_CREDENTIALS = f"{RAY_HOME}/.aws/credentials"
MLFLOW_CLIENT_LABEL = "aploss.io/mlflow-client"


def _example_secret_values() -> dict[tuple[str, str], str]:
    """The example Secrets' values as an operator fills them in: each placeholder a distinct value."""
    return {(doc["metadata"]["name"], key): value.replace("CHANGE-ME", "filled-in")
            for _, doc in _objects("Secret") for key, value in doc.get("stringData", {}).items()}


def test_the_jobs_account_job_creates_the_account_the_ray_pods_use(tmp_path, monkeypatch):
    (_, job), = [(p, d) for p, d in _objects("Job") if d["metadata"]["name"] == "mlflow-jobs-account"]
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {entry["name"]: entry["value"] for entry in container["env"]}
    server = _mlflow_server()["containers"][0]
    # The admin: the files of the same Secret keys the server creates the admin from.
    admin = {name: _secret_file(spec, container, f"{env['ADMIN_DIR']}/{name}")
             for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")}
    for name, found in admin.items():
        assert found and found[:2] == _secret_ref(server, name), f"the Job's {name} is not the server's"
    # The account: the credentials file every Ray pod that logs mounts as ~/.mlflow/credentials.
    account = _secret_file(spec, container, env["ACCOUNT_CREDENTIALS_FILE"])
    assert account and not account[2], "the Job reads the account from no Secret"
    logging_pods = [pod for pod in RAY_PODS if pod.labels.get(MLFLOW_CLIENT_LABEL) == "true"]
    assert logging_pods
    for pod in logging_pods:
        used = _secret_file(pod.spec, pod.spec["containers"][0], MLFLOW_CREDENTIALS)
        assert used == account, f"{pod.where}: logs to MLflow as {used}, the Job creates {account}"

    # The Job's script, with the example Secrets filled in, creates exactly the user that MLflow's
    # client reads from the same file in a Ray pod's home.
    values = _example_secret_values()
    (tmp_path / "admin").mkdir()
    for name, (secret, key, _) in admin.items():
        (tmp_path / "admin" / name).write_text(values[secret, key])
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text(values[account[0], account[1]])
    calls = []

    class FakeAdmin:
        def create_user(self, name, password):
            calls.append((os.environ["MLFLOW_TRACKING_USERNAME"], name, password))

    import mlflow.server
    from mlflow.utils.credentials import read_mlflow_creds

    monkeypatch.setattr(mlflow.server, "get_app_client", lambda app, tracking_uri: FakeAdmin())
    monkeypatch.setenv("ADMIN_DIR", str(tmp_path / "admin"))
    monkeypatch.setenv("ACCOUNT_CREDENTIALS_FILE", str(home / ".mlflow" / "credentials"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert container["command"] == ["python", "-c"]
    exec(compile(container["args"][0], "mlflow-jobs-account", "exec"), {})
    (admin_name, name, password), = calls
    assert admin_name == values[admin["MLFLOW_AUTH_ADMIN_USERNAME"][:2]], "the Job did not log in as the admin"
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("HOME", str(home))
    assert tuple(read_mlflow_creds()) == (name, password)


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
        {k: v for k, v in kubernetes.items() if k != "database_uri"}, \
        "compose and Kubernetes differ in their auth settings"


def test_the_shared_volume_is_read_write_many():
    claims = {doc["metadata"]["name"]: doc for _, doc in _objects("PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims["aploss-shared"]["spec"]["accessModes"]


# ----------------------------------------------------------------------------- Ray on Kubernetes

def _ray_version_of_image() -> str:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    versions = set(re.findall(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py\d+", text, re.M))
    assert len(versions) == 1, f"infra/docker/Dockerfile: base images of Ray versions {versions or 'none'}"
    return versions.pop()


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
    # The job's driver runs on the head: it logs to MLflow, with a credentials file it cannot
    # start without.
    head_template = head["template"]
    assert head_template["metadata"]["labels"].get(MLFLOW_CLIENT_LABEL) == "true", f"{where}: the head cannot log"
    found = _secret_file(head_template["spec"], head_container, MLFLOW_CREDENTIALS)
    assert found and not found[2], f"{where}: the head has no MLflow credentials file {MLFLOW_CREDENTIALS}"


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


LAUNCHER_COMMANDS = ("initialization_commands", "setup_commands", "head_start_ray_commands",
                     "worker_start_ray_commands")
OPEN_TO_ALL = {"0.0.0.0/0", "::/0"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=[_rel(p) for p in LAUNCHER_FILES])
def test_cluster_launcher_keeps_ray_private(path):
    (doc,) = DOCS[path]
    # Extra rules of a Ray-made security group must not open anything (the dashboard, say) to
    # the world.
    for rule in doc["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
            [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        assert not OPEN_TO_ALL & set(ranges), f"security group rule {rule} is open to the world"
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in doc[key]
              if "ray start" in c]
    assert starts
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command, f"`{command}` starts Ray without token auth"
    for key in LAUNCHER_COMMANDS:
        for command in doc.get(key, []):
            literal = [m for m in re.findall(r"(\w+)=([^\s$]\S*)", command) if SECRET_LIKE.search(m[0])]
            assert not literal, f"{key}: credentials written into the config: {[name for name, _ in literal]}"


# `. FILE` or `source FILE` at the start of a command or after a shell operator, and `set -a`,
# which exports whatever a sourced file assigns.
_SOURCES = re.compile(r"(?:^|[;&|(]|\bthen\b|\bdo\b)\s*(?:\.|source)\s+\S|\bset\s+-\w*a")


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=[_rel(p) for p in LAUNCHER_FILES])
def test_cluster_launcher_reads_credentials_without_running_them(path):
    (doc,) = DOCS[path]
    for key in LAUNCHER_COMMANDS:
        for command in doc.get(key, []):
            assert not _SOURCES.search(command), f"{key}: `{command}` runs a file as shell"
    # MLflow's client reads the jobs' account itself from ~/.mlflow/credentials on every node.
    mounts = doc.get("file_mounts", {})
    assert MLFLOW_CREDENTIALS in mounts, f"no file_mounts entry for {MLFLOW_CREDENTIALS}"
    assert not any(".env" in str(source) for source in mounts.values()), "an env file is still synced"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=[_rel(p) for p in LAUNCHER_FILES])
def test_cluster_launcher_limits_ssh_to_a_chosen_cidr(path):
    (doc,) = DOCS[path]
    # A security group that Ray creates always admits SSH from 0.0.0.0/0, so every node type
    # names the group the file's instructions create.
    for name, node in doc["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds"), f"{name}: Ray would make a group open to SSH from anywhere"
    text = path.read_text()
    cidrs = re.findall(r"(?:--cidr(?:-ipv6)?[ =]|CIDR=|Cidr(?:Ip|Ipv6): )\"?([0-9a-fA-F.:]+/\d+)", text)
    assert cidrs, "the SSH source range is not set anywhere"
    assert not OPEN_TO_ALL & set(cidrs), f"SSH open to the world: {cidrs}"


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
    # Compose names them as repository:tag@digest, with the digests of infra/kustomization.yaml.
    digests = {entry["name"]: entry.get("digest") for entry in _kustomization()["images"]}
    assert compose_images == {f"{image}@{digests.get(image)}" for image in k8s_images}
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


# ----------------------------------------------------------------------------- hardening: pods

@dataclass(frozen=True, eq=False)
class Pod:
    """A pod as it will run from a template: the spec as written, every container including the
    ones KubeRay adds, and the labels the pod will carry."""
    where: str
    owner: str  # Kind/name of the object holding the template
    role: str  # "pod"; for Ray: "head", a worker group's name, or "submitter"
    spec: dict
    containers: list
    labels: dict
    namespace: str
    claim_templates: frozenset = frozenset()  # a StatefulSet's volumeClaimTemplates


# Labels KubeRay puts on every Ray pod besides ray.io/cluster and ray.io/node-type; the template's
# own labels win over these.
KUBERAY_LABELS = {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator",
                  "ray.io/is-ray-node": "yes"}


def _ray_pods(path: Path, spec: dict, owner: str, cluster: str, namespace: str) -> list[Pod]:
    head_extra = []
    if spec.get("enableInTreeAutoscaling"):
        # KubeRay's autoscaler sidecar takes its securityContext and extra mounts from autoscalerOptions,
        # and its image from there too, or else from the head.
        options = spec.get("autoscalerOptions", {})
        head_extra.append({"name": "autoscaler", "securityContext": options.get("securityContext"),
                           "volumeMounts": options.get("volumeMounts", []),
                           **({"image": options["image"]} if "image" in options else {})})
    templates = [("head", spec["headGroupSpec"]["template"], head_extra)]
    for group in spec.get("workerGroupSpecs", []):
        # KubeRay's wait-gcs-ready init container copies the Ray container's securityContext and mounts.
        ray = group["template"]["spec"]["containers"][0]
        wait = {"name": "wait-gcs-ready", "securityContext": ray.get("securityContext"),
                "volumeMounts": ray.get("volumeMounts", [])}
        templates.append((group["groupName"], group["template"], [wait]))
    return [Pod(f"{_rel(path)}: {owner} {role}", owner, role, template["spec"], _containers(template) + extra,
                {**KUBERAY_LABELS, **template.get("metadata", {}).get("labels", {}), "ray.io/cluster": cluster,
                 "ray.io/node-type": "head" if role == "head" else "worker"}, namespace)
            for role, template, extra in templates]


def _pods_of(path: Path, doc: dict) -> list[Pod]:
    name, namespace = doc["metadata"]["name"], doc["metadata"].get("namespace")
    owner = f"{doc['kind']}/{name}"
    job_labels = {"batch.kubernetes.io/job-name": name, "job-name": name}
    if doc["kind"] == "RayCluster":
        return _ray_pods(path, doc["spec"], owner, name, namespace)
    if doc["kind"] == "RayJob":
        # KubeRay names a RayJob's cluster after the RayJob plus a random suffix.
        pods = _ray_pods(path, doc["spec"]["rayClusterSpec"], owner, f"{name}-x7k2p", namespace)
        submitter = doc["spec"].get("submitterPodTemplate")
        if submitter:
            pods.append(Pod(f"{_rel(path)}: {owner} submitter", owner, "submitter", submitter["spec"],
                            _containers(submitter), {**submitter["metadata"]["labels"], **job_labels}, namespace))
        return pods
    template = doc["spec"]["template"]
    labels = {**template["metadata"]["labels"], **(job_labels if doc["kind"] == "Job" else {})}
    claims = frozenset(t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", []))
    return [Pod(f"{_rel(path)}: {owner}", owner, "pod", template["spec"], _containers(template), labels, namespace,
                claims)]


PODS = [pod for path, doc in WORKLOADS for pod in _pods_of(path, doc)]
RAY_PODS = [pod for pod in PODS if "ray.io/node-type" in pod.labels]
POD_IDS = [pod.where for pod in PODS]
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def test_every_workload_yields_pods():
    owners = {pod.owner for pod in PODS}
    assert owners == {f"{doc['kind']}/{doc['metadata']['name']}" for _, doc in WORKLOADS}
    assert {pod.role for pod in RAY_PODS} >= {"head", "cpu-group", "gpu-group"}


@pytest.mark.parametrize("pod", PODS, ids=POD_IDS)
def test_pod_meets_the_restricted_pod_security_standard(pod):
    """The "restricted" level of the Pod Security Standards (which includes "baseline"), field by
    field, for the containers KubeRay adds as well; the namespace also enforces it."""
    spec, context = pod.spec, pod.spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(field), f"{field} shares the node's namespaces"
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= RESTRICTED_VOLUMES, f"volume {volume['name']}: {kinds} is not allowed (hostPath?)"
    assert not context.get("sysctls"), "sysctls"
    assert context.get("runAsUser") != 0, "the pod runs as root"
    pod_non_root = context.get("runAsNonRoot") is True
    pod_seccomp = context.get("seccompProfile", {}).get("type")
    assert pod_seccomp in (None, "RuntimeDefault", "Localhost"), f"pod seccomp profile {pod_seccomp}"
    assert context.get("appArmorProfile", {}).get("type") != "Unconfined"
    assert context.get("seLinuxOptions", {}).get("type", "") in SELINUX_TYPES
    for container in pod.containers:
        at = f"container {container['name']}"
        sc = container.get("securityContext") or {}
        assert not sc.get("privileged"), f"{at} is privileged"
        assert not any("hostPort" in port for port in container.get("ports", [])), f"{at} takes a host port"
        assert sc.get("procMount", "Default") == "Default", f"{at}: procMount"
        assert sc.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation must be false"
        assert sc.get("runAsNonRoot", pod_non_root) is True, f"{at} may run as root (runAsNonRoot)"
        assert sc.get("runAsUser") != 0, f"{at} runs as root"
        seccomp = sc.get("seccompProfile", {}).get("type") or pod_seccomp
        assert seccomp in ("RuntimeDefault", "Localhost"), f"{at}: seccomp profile {seccomp}"
        capabilities = sc.get("capabilities", {})
        assert "ALL" in capabilities.get("drop", []), f"{at} keeps capabilities (drop ALL)"
        assert set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{at} adds capabilities"
        assert sc.get("appArmorProfile", {}).get("type") != "Unconfined", f"{at}: AppArmor unconfined"
        assert sc.get("seLinuxOptions", {}).get("type", "") in SELINUX_TYPES, f"{at}: SELinux type"
        assert not {"user", "role"} & set(sc.get("seLinuxOptions", {})), f"{at}: SELinux user or role"
        assert sc.get("readOnlyRootFilesystem") is True, f"{at}: the root filesystem is writable"


# Where each container's program writes at run time: with a read-only root filesystem each of
# these must be a writable volume of the pod.
WRITES = {
    "postgres": {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"},  # data, socket and lock file
    "minio": {"/data", "/tmp"},  # objects; ~/.minio/certs with HOME=/tmp
    "mc": {"/tmp"},  # ~/.mc with HOME=/tmp
    "mlflow": {"/tmp"},  # artifacts passing through the proxy
    "create-account": {"/tmp"},
    "ray-head": {"/tmp", f"{RAY_HOME}/.cache", SHARED_MOUNT},  # /tmp/ray; compiled kernel, data cache
    "ray-worker": {"/tmp", f"{RAY_HOME}/.cache", SHARED_MOUNT},
    "wait-gcs-ready": {"/tmp"},
    "autoscaler": {"/tmp"},
    "ray-job-submitter": {"/tmp"},
}
WRITABLE_VOLUMES = {"emptyDir", "persistentVolumeClaim", "ephemeral"}


@pytest.mark.parametrize("pod", PODS, ids=POD_IDS)
def test_read_only_containers_have_volumes_where_they_write(pod):
    writable = {v["name"] for v in pod.spec.get("volumes", []) if WRITABLE_VOLUMES & set(v)} | pod.claim_templates
    for container in pod.containers:
        assert container["name"] in WRITES, f"{container['name']}: say in WRITES where it writes"
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for path in WRITES[container["name"]]:
            mount = mounts.get(path)
            assert mount and mount["name"] in writable and not mount.get("readOnly"), \
                f"{container['name']} writes to {path}, which is no writable volume"
        home = _env_entry(container, "HOME").get("value")
        if home:
            assert home in WRITES[container["name"]], f"{container['name']}: HOME={home} is read-only"


# ----------------------------------------------------------------------------- hardening: tokens

TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"  # where Ray's autoscaler reads it


def _token_volumes(spec: dict) -> set[str]:
    return {v["name"] for v in spec.get("volumes", [])
            if any("serviceAccountToken" in source for source in v.get("projected", {}).get("sources", []))}


@pytest.mark.parametrize("pod", PODS, ids=POD_IDS)
def test_pod_mounts_no_service_account_token(pod):
    assert pod.spec.get("automountServiceAccountToken") is False, "the pod mounts a ServiceAccount token"
    if pod.role == "head":
        # KubeRay gives the head the autoscaler's ServiceAccount, bound to the Role that lets it
        # scale the cluster; only the autoscaler sidecar, which calls the API, gets its token.
        assert "serviceAccountName" not in pod.spec, "KubeRay binds the autoscaler's role to the head's account"
    else:
        assert pod.spec.get("serviceAccountName") == "aploss-workload", "not the aploss workload account"
    tokens = _token_volumes(pod.spec)
    for container in pod.containers:
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] in tokens]
        if container["name"] == "autoscaler":
            assert [m["mountPath"] for m in mounts] == [TOKEN_PATH], "the autoscaler cannot reach the API"
        else:
            assert not mounts, f"{container['name']} mounts a ServiceAccount token"


def test_workload_service_account_has_no_token_and_no_role():
    (_, account), = [(p, d) for p, d in _objects("ServiceAccount") if d["metadata"]["name"] == "aploss-workload"]
    assert account["automountServiceAccountToken"] is False
    assert not [doc for _, doc in OBJECTS if doc["kind"] in ("Role", "RoleBinding", "ClusterRoleBinding")]


def test_namespace_enforces_the_restricted_standard():
    (_, namespace), = _objects("Namespace")
    assert namespace["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"


# ----------------------------------------------------------------------------- hardening: network

NETWORK_POLICIES = [doc for _, doc in _objects("NetworkPolicy")]
# Pods that are not aploss's: the KubeRay operator (Helm install of infra/README.md), another pod
# of its namespace and of aploss, and a pod of another namespace that copies aploss's labels.
KUBERAY_OPERATOR = Pod("the KubeRay operator", "Deployment/kuberay-operator", "pod", {}, [],
                       {"app.kubernetes.io/name": "kuberay-operator"}, "kuberay-system")
STRANGERS = [Pod("another pod in aploss", "Pod/other", "pod", {}, [], {"app": "other"}, "aploss"),
             Pod("another pod in kuberay-system", "Pod/other", "pod", {}, [], {"app": "other"}, "kuberay-system"),
             Pod("a look-alike in another namespace", "Pod/fake", "pod", {}, [],
                 {"app.kubernetes.io/name": "mlflow", MLFLOW_CLIENT_LABEL: "true", "aploss.io/ray-cluster": "aploss"},
                 "default")]
SOURCES = PODS + [KUBERAY_OPERATOR, *STRANGERS]
# Ports probed on every pod: the stack's, Ray's (GCS, dashboard, client, metrics, dashboard agent)
# and one of the many a Ray worker picks.
PROBE_PORTS = {5000, 5432, 9000, 9001, 6379, 8265, 10001, 8080, 52365, 41234}


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions) against labels; {} selects everything."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                   "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not matched:
            return False
    return True


def _peer_matches(peer: dict, namespace: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        return True  # an address range may hold any pod
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:
        in_namespace = source.namespace == namespace
    return in_namespace and _selects(peer.get("podSelector", {}), source.labels)


def _port_matches(ports: list | None, port: int) -> bool:
    return not ports or any(p.get("protocol", "TCP") == "TCP" and p.get("port", port) == port for p in ports)


def _admitted(target: Pod, port: int) -> set[str]:
    """The sources whose TCP connections to `target` on `port` the NetworkPolicies let in."""
    policies = [doc for doc in NETWORK_POLICIES if doc["metadata"]["namespace"] == target.namespace
                and "Ingress" in doc["spec"].get("policyTypes", ["Ingress"])
                and _selects(doc["spec"]["podSelector"], target.labels)]
    if not policies:
        return {source.where for source in SOURCES}
    admitted = set()
    for doc in policies:
        for rule in doc["spec"].get("ingress", []):
            if _port_matches(rule.get("ports"), port):
                admitted |= {source.where for source in SOURCES if not rule.get("from")
                             or any(_peer_matches(peer, doc["metadata"]["namespace"], source) for peer in rule["from"])}
    return admitted


def _logs_to_mlflow(pod: Pod) -> bool:
    """Ray heads run the job drivers, CPU groups the Tune trials' drivers: these log to MLflow."""
    return pod in RAY_PODS and pod.role in ("head", "cpu-group")


def _of(owner: str, *roles: str) -> set[str]:
    return {pod.where for pod in SOURCES if pod.owner == owner and (not roles or pod.role in roles)}


def _intended(target: Pod, port: int) -> set[str]:
    """Who may connect to `target` on `port`: infra/README.md's table "Who can reach what"."""
    if target.owner == "StatefulSet/postgres":
        return _of("Deployment/mlflow") if port == 5432 else set()
    if target.owner == "Deployment/minio":
        return _of("Deployment/mlflow") | _of("Job/minio-create-bucket") if port == 9000 else set()
    if target.owner == "Deployment/mlflow":
        logging = {pod.where for pod in PODS if _logs_to_mlflow(pod)}
        return logging | _of("Job/mlflow-jobs-account") if port == 5000 else set()
    if target in RAY_PODS:
        cluster = {pod.where for pod in RAY_PODS if pod.owner == target.owner}
        if target.role == "head" and port == 8265:
            return cluster | _of(target.owner, "submitter") | {KUBERAY_OPERATOR.where}
        return cluster
    return set()  # submitters and Jobs serve nothing


@pytest.mark.parametrize("pod", PODS, ids=POD_IDS)
def test_network_policies_admit_exactly_the_intended_peers(pod):
    ports = PROBE_PORTS | {p["containerPort"] for c in pod.containers for p in c.get("ports", [])}
    for port in sorted(ports):
        admitted, intended = _admitted(pod, port), _intended(pod, port)
        assert admitted == intended, \
            f"port {port}: admits also {sorted(admitted - intended)}, refuses {sorted(intended - admitted)}"


def test_network_policies_deny_ingress_by_default():
    defaults = [doc for doc in NETWORK_POLICIES if doc["spec"]["podSelector"] == {}]
    assert any("Ingress" in doc["spec"].get("policyTypes", []) and not doc["spec"].get("ingress")
               for doc in defaults), "no default-deny ingress policy for the namespace"
    for doc in NETWORK_POLICIES:
        assert doc["metadata"]["namespace"] == "aploss"
        if doc["spec"]["podSelector"]:
            assert any(_selects(doc["spec"]["podSelector"], pod.labels) for pod in PODS), \
                f"NetworkPolicy/{doc['metadata']['name']} selects no pod"


def test_ray_clusters_carry_their_policy_label():
    # The label the policies select a cluster's pods by: one value per cluster, on all its pods.
    for owner in {pod.owner for pod in RAY_PODS}:
        values = {pod.labels.get("aploss.io/ray-cluster") for pod in RAY_PODS if pod.owner == owner}
        assert len(values) == 1 and None not in values, f"{owner}: aploss.io/ray-cluster {values}"
        assert values == {owner.split("/")[1]}, f"{owner}: name the cluster after its object"


# ----------------------------------------------------------------------------- hardening: secrets

def _secret_uses(pod: Pod) -> dict[str, set[str]]:
    """Each Secret a pod gets, with how: "env", or the paths it is mounted at."""
    volumes = {}
    for volume in pod.spec.get("volumes", []):
        sources = [volume] + volume.get("projected", {}).get("sources", [])
        volumes[volume["name"]] = [s["secret"].get("secretName") or s["secret"].get("name")
                                   for s in sources if "secret" in s]
    uses = {}
    for container in pod.containers:
        for mount in container.get("volumeMounts", []):
            for name in volumes.get(mount["name"], []):
                uses.setdefault(name, set()).add(mount["mountPath"])
        refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})]
        refs += [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]
        for name in refs:
            uses.setdefault(name, set()).add("env")
    return uses


# Which pods may read each Secret (infra/README.md, Hardening). MinIO's root keys stay with MinIO
# and the Job that creates the scoped users; the Ray pods get only a scoped S3 user and, where
# they log, the jobs' MLflow account.
SECRET_READERS = {
    "mlflow-postgres": lambda pod: pod.owner in ("StatefulSet/postgres", "Deployment/mlflow"),
    "minio-root": lambda pod: pod.owner in ("Deployment/minio", "Job/minio-create-bucket"),
    "mlflow-s3": lambda pod: pod.owner in ("Deployment/mlflow", "Job/minio-create-bucket"),
    "mlflow-auth": lambda pod: pod.owner in ("Deployment/mlflow", "Job/mlflow-jobs-account"),
    "mlflow-client": lambda pod: pod.owner == "Job/mlflow-jobs-account" or _logs_to_mlflow(pod),
    "aploss-s3": lambda pod: pod.owner == "Job/minio-create-bucket" or pod in RAY_PODS,
}


def test_each_secret_reaches_only_its_readers():
    assert set(SECRET_READERS) == _names("Secret"), "every Secret needs its readers in SECRET_READERS"
    for secret, reads in SECRET_READERS.items():
        readers = {pod.where for pod in PODS if secret in _secret_uses(pod)}
        intended = {pod.where for pod in PODS if reads(pod)}
        assert readers == intended, \
            f"{secret}: also read by {sorted(readers - intended)}, missing from {sorted(intended - readers)}"


# The Ray pods' secrets, as the files the programs read themselves: (Secret, key, optional).
RAY_SECRET_FILES = {MLFLOW_CREDENTIALS: ("mlflow-client", "credentials", False),
                    AWS_CREDENTIALS: ("aploss-s3", "credentials", True)}


@pytest.mark.parametrize("pod", RAY_PODS, ids=[pod.where for pod in RAY_PODS])
def test_ray_pods_get_their_secrets_as_files_only(pod):
    uses = _secret_uses(pod)
    assert not any("env" in how for how in uses.values()), "a Secret in the environment reaches every Ray worker"
    ray = pod.spec["containers"][0]
    for path, (secret, key, optional) in RAY_SECRET_FILES.items():
        found = _secret_file(pod.spec, ray, path)
        if secret in uses:
            assert found == (secret, key, optional), f"{path} is {found}, not {secret}/{key}"
            assert uses[secret] == {str(Path(path).parent)}, f"{secret} mounted at {uses[secret]}"


@pytest.mark.parametrize("pod", PODS, ids=POD_IDS)
def test_secret_volumes_are_read_only_to_the_pod_user(pod):
    secrets = {v["name"]: v["secret"] for v in pod.spec.get("volumes", []) if "secret" in v}
    if secrets:
        # Secret files belong to root; fsGroup lets the non-root user read them (mode 0440).
        assert pod.spec["securityContext"].get("fsGroup"), "no fsGroup: the user cannot read its Secret files"
    for name, secret in secrets.items():
        assert secret.get("defaultMode") == 0o400, f"volume {name}: defaultMode {secret.get('defaultMode')}"
        assert all("mode" not in item for item in secret.get("items", [])), f"volume {name}: an item's mode"
    for container in pod.containers:
        for mount in container.get("volumeMounts", []):
            if mount["name"] in secrets:
                assert mount.get("readOnly") is True, f"{container['name']}: {mount['name']} is mounted writable"


# Images whose programs read their secrets from *_FILE variables: no secret value in their
# environment at all.
FILE_VARIANT_IMAGES = ("postgres:", "quay.io/minio/minio:")


@pytest.mark.parametrize("pod", PODS, ids=POD_IDS)
def test_file_variants_replace_secret_variables(pod):
    for container in pod.containers:
        env = {entry["name"]: entry for entry in container.get("env", [])}
        from_secret = {name for name, entry in env.items() if "secretKeyRef" in entry.get("valueFrom", {})}
        assert not {name.removesuffix("_FILE") for name in env if name.endswith("_FILE")} & from_secret, \
            f"{container['name']}: both X and X_FILE"
        if container.get("image", "").startswith(FILE_VARIANT_IMAGES):
            assert not from_secret and not any("secretRef" in s for s in container.get("envFrom", [])), \
                f"{container['name']}: the image reads *_FILE; its secrets belong in files"


def test_minio_users_are_limited_to_their_own_bucket():
    (_, policies), = [(p, d) for p, d in _objects("ConfigMap") if d["metadata"]["name"] == "minio-policies"]
    assert policies["data"]
    for key, text in policies["data"].items():
        bucket = key.removesuffix(".json")
        statements = json.loads(text)["Statement"]
        resources = {r for s in statements for r in s["Resource"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, f"{key}: {resources}"
        assert all(s["Effect"] == "Allow" for s in statements)
        actions = {a for s in statements for a in s["Action"]}
        assert all(a.startswith("s3:") and "*" not in a and "Policy" not in a for a in actions), f"{key}: {actions}"
    (_, job), = [(p, d) for p, d in _objects("Job") if d["metadata"]["name"] == "minio-create-bucket"]
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    granted = set(re.findall(r"^\s*grant (\w+) ", script, re.M))
    assert granted == {key.removesuffix(".json") for key in policies["data"]}, "a bucket without its user or policy"


# ----------------------------------------------------------------------------- hardening: files

def _infra_texts() -> list[Path]:
    return [path for path in sorted(INFRA.rglob("*")) if path.is_file() and path.name != "README.md"
            and path.suffix != ".lock"]


_CHMOD = re.compile(r"\bchmod\s+(?:-\w+\s+)*(\S+)")


def _world_writable(mode: str) -> bool:
    if re.fullmatch(r"[0-7]{3,4}", mode):
        return bool(int(mode[-1]) & 2)
    return any(op in "+=" and "w" in perms and (not who or {"o", "a"} & set(who))
               for who, op, perms in re.findall(r"([ugoa]*)([+=-])([rwxXst]*)", mode))


def test_nothing_is_made_world_writable():
    for path in _infra_texts():
        for mode in _CHMOD.findall(path.read_text()):
            assert not _world_writable(mode), f"{_rel(path)}: chmod {mode} makes something world-writable"

    def modes(node):
        if isinstance(node, dict):
            yield from (v for k, v in node.items() if k in ("defaultMode", "mode") and isinstance(v, int))
            yield from (m for v in node.values() for m in modes(v))
        elif isinstance(node, list):
            yield from (m for v in node for m in modes(v))

    for path, doc in OBJECTS:
        assert not [oct(m) for m in modes(doc) if m & 0o002], f"{_rel(path)}: a world-writable file mode"


def test_world_writable_modes_are_recognised():
    assert all(map(_world_writable, ["1777", "777", "0666", "o+w", "a+rw", "+w", "u=rwx,o=rwx"]))
    assert not any(map(_world_writable, ["2770", "600", "0755", "g+w", "o-w", "u+rwx"]))


# ----------------------------------------------------------------------------- hardening: images

def _kustomization() -> dict:
    (doc,) = DOCS[KUSTOMIZATION]
    return doc


DIGEST = re.compile(r"sha256:(?:[0-9a-f]{64}|CHANGE-ME)")  # a digest, or the placeholder that fails closed
DEPLOY_PARTS = {"base", "raycluster", "pipeline", "sweep"}


def test_kustomization_builds_every_kubernetes_object_but_the_secrets():
    listed = {INFRA / resource for resource in _kustomization()["resources"]}
    assert listed == {path for path, _ in OBJECTS if not path.name.endswith(".example.yaml")}


def test_every_object_is_labelled_with_its_part():
    # `kubectl apply -k infra -l aploss.io/deploy=PART` applies one part; the base must never
    # start a job.
    text = (INFRA / "README.md").read_text()
    for path, doc in OBJECTS:
        if path.name.endswith(".example.yaml"):
            continue
        part = doc["metadata"].get("labels", {}).get("aploss.io/deploy")
        expected = {"RayCluster": "raycluster", "RayJob": doc["metadata"]["name"].removeprefix("aploss-")}
        assert part == expected.get(doc["kind"], "base"), f"{_rel(path)}: {doc['kind']} labelled {part!r}"
    for part in DEPLOY_PARTS:
        assert f"kubectl apply -k infra -l aploss.io/deploy={part}" in text, f"README does not apply {part}"


def test_every_image_is_pinned_by_digest_in_the_kustomization():
    entries = _kustomization()["images"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), "an image is listed twice"
    used = {c["image"] for pod in PODS for c in pod.containers if "image" in c}
    assert used == set(names), f"images without an entry: {used - set(names)}; entries unused: {set(names) - used}"
    for entry in entries:
        assert DIGEST.fullmatch(entry.get("digest", "")), f"{entry['name']}: digest {entry.get('digest')!r}"
        assert set(entry) <= {"name", "newName", "digest"}, f"{entry['name']}: {set(entry)}"


def _images_in(node) -> list[str]:
    """Every container image anywhere in an object (CRDs included), as kustomize sees them."""
    if isinstance(node, dict):
        found = [c["image"] for key in ("containers", "initContainers") for c in node.get(key, []) if "image" in c]
        found += [node["autoscalerOptions"]["image"]] if "image" in node.get("autoscalerOptions", {}) else []
        return found + [i for value in node.values() for i in _images_in(value)]
    if isinstance(node, list):
        return [i for value in node for i in _images_in(value)]
    return []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
def test_kustomize_build_pins_every_image():
    built = subprocess.run(["kubectl", "kustomize", str(INFRA)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert len(objects) == len([1 for path, _ in OBJECTS if not path.name.endswith(".example.yaml")])
    images = [image for doc in objects for image in _images_in(doc)]
    assert images and all(re.fullmatch(r"[^@\s]+@" + DIGEST.pattern, image) for image in images), \
        f"not pinned by digest: {sorted({i for i in images if '@sha256:' not in i})}"


def _dockerfile() -> str:
    return (INFRA / "docker" / "Dockerfile").read_text()


def _base_images() -> dict[str, str]:
    """The Dockerfile's external base images by stage name."""
    return dict((stage, image) for image, stage in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", _dockerfile(), re.M)
                if "$" not in image)


def test_dockerfile_pins_its_base_images_by_digest():
    text = _dockerfile()
    bases = _base_images()
    assert bases, "no base image"
    for stage, image in bases.items():
        assert re.fullmatch(r"[^@\s:]+(:[\w.-]+)?@" + DIGEST.pattern, image), f"stage {stage}: {image} has no digest"
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for reference in re.findall(r"^FROM\s+(\S+)\s*$", text, re.M):
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], reference)
        assert resolved in bases, f"FROM {reference}: neither a pinned stage nor pinned by digest"
    # The documented CPU build (--build-arg VARIANT=cpu) has a pinned stage too.
    assert {f"ray-{variant}" for variant in ("gpu", "cpu")} <= set(bases)


def _pip_installs(text: str) -> list[list[str]]:
    text = text.replace("\\\n", " ")
    return [shlex.split(match) for match in re.findall(r"pip install([^&;|\n]*)", text)]


def _locked(args: list[str]) -> bool:
    """Every package from a hash-checked lock, or only the project itself, without dependencies."""
    if "--require-hashes" in args:
        return "--no-deps" in args and "-r" in args
    return "--no-deps" in args and "--no-build-isolation" in args and args[-1] in (".", APP_DIR)


def test_dockerfile_installs_only_locked_dependencies():
    installs = _pip_installs(_dockerfile())
    assert installs and all(_locked(args) for args in installs), f"unlocked pip install: {installs}"
    locks = [args[args.index("-r") + 1] for args in installs if "-r" in args]
    assert locks == ["infra/docker/requirements.lock"]


def _lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of infra/docker/requirements.lock."""
    text = (INFRA / "docker" / "requirements.lock").read_text().replace("\\\n", " ")
    entries = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)\s", line + " ")
            assert match, f"requirements.lock: not pinned with ==: {line[:80]}"
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            entries[name] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})\b", line))
    return entries


def test_dependency_lock_pins_every_dependency_with_hashes():
    entries = _lock_entries()
    for name, (version, hashes) in entries.items():
        assert hashes, f"requirements.lock: {name}=={version} has no hash"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    for requirement in needed:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert name in entries, f"requirements.lock lacks {name} ({requirement}): regenerate it (infra/README.md)"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=[_rel(p) for p in LAUNCHER_FILES])
def test_cluster_launcher_runs_the_dockerfiles_base_images_and_lock(path):
    (doc,) = DOCS[path]
    images = {doc["docker"][key] for key in ("image", "head_image", "worker_image") if key in doc["docker"]}
    assert images and images <= set(_base_images().values()), f"{images} are not the Dockerfile's pinned bases"
    installs = [args for command in doc.get("setup_commands", []) for args in _pip_installs(command)]
    assert installs and all(_locked(args) for args in installs), f"unlocked pip install: {installs}"


# ----------------------------------------------------------------------------- checkov

# The checkov findings these files accept on purpose. The test fails on any other finding, and
# on a skip that no longer finds anything.
CHECKOV_SKIPS = {
    "CKV_K8S_40": "PostgreSQL runs as its image's user 999, which owns existing data directories",
    "CKV_K8S_35": "the MLflow server reads its admin, Flask key and PGPASSWORD from the environment only",
    "CKV_DOCKER_2": "Kubernetes probes (KubeRay's) check the pods' health; docker's HEALTHCHECK is ignored there",
    "CKV_DOCKER_7": "flags `FROM ray-${VARIANT}`, a stage of the same Dockerfile; stages are pinned by digest",
}
CHECKOV = os.environ.get("CHECKOV") or shutil.which("checkov")


def _checkov_failures(*arguments: str) -> set[str]:
    run = subprocess.run([CHECKOV, *arguments, "--skip-download", "--quiet", "-o", "json"],
                         capture_output=True, text=True, timeout=600)
    report = json.loads(run.stdout)
    assert report["summary"]["parsing_errors"] == 0, run.stdout[-2000:]
    assert report["summary"]["resource_count"] > 0, "checkov found nothing to check"
    return {check["check_id"] for check in report.get("results", {}).get("failed_checks", [])}


@pytest.mark.skipif(CHECKOV is None or shutil.which("kubectl") is None,
                    reason="needs checkov (`pip install checkov` in a venv of its own; on PATH or in $CHECKOV) "
                           "and kubectl")
def test_checkov_finds_nothing_but_the_accepted(tmp_path):
    # The objects as they are applied, digests in place (checkov does not read kustomize's images).
    built = subprocess.run(["kubectl", "kustomize", str(INFRA)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (tmp_path / "aploss.yaml").write_text(built.stdout)
    failed = _checkov_failures("-d", str(tmp_path), "--framework", "kubernetes")
    failed |= _checkov_failures("-f", str(INFRA / "docker" / "Dockerfile"), "--framework", "dockerfile")
    accepted = set(CHECKOV_SKIPS)
    assert failed == accepted, \
        f"new findings: {sorted(failed - accepted)}; skips not needed: {sorted(accepted - failed)}"
