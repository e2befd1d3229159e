"""The Helm chart, linted and rendered by Helm's own Go engine (helm-python-sdk).

Each value set is rendered once; every object must pass the Kubernetes JSON schemas
(kubernetes-validate, strict: unknown fields fail), no pod may run as root, and the
environment the chart gives each neurodissect container must be exactly settings that
services.common.settings reads — and must load into a coherent Settings object.
"""

from __future__ import annotations

import base64
import json
import posixpath
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from services.common.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, SERVICES, Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "neurodissect"
RELEASE = "nd"
NAMESPACE = "ml"
FULLNAME = f"{RELEASE}-neurodissect"
# The oldest Kubernetes the chart supports (native gRPC probes are GA in 1.27) and the newest
# schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
# Custom resources kubernetes-validate has no schema for: checked by hand below.
CUSTOM_KINDS = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
SETTINGS_ENV = frozenset(Settings().environment())
# Variables Ray itself reads (token authentication), set on the Ray pods and the explainer.
RAY_ENV = frozenset({"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"})

FAKE_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
FAKE_KEY = "-----BEGIN PRIVATE KEY-----\nMIIBfake\n-----END PRIVATE KEY-----\n"

VALUE_SETS: dict[str, dict[str, Any]] = {
    # In-chart MinIO, KubeRay RayCluster, dashboard ConfigMap; no TLS, no token.
    "defaults": {},
    # An external S3 endpoint with credentials from an existing Secret, no MinIO.
    "external-s3": {
        "minio": {"enabled": False},
        "store": {
            "endpoint": "s3.eu-west-1.amazonaws.com:443",
            "secure": True,
            "region": "eu-west-1",
            "bucket": "dissections",
            "prefix": "/team-a/",
            "existingSecret": "aws-keys",
            "accessKeyKey": "AWS_ACCESS_KEY_ID",
            "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
        },
        # Big numbers must reach the services as integers, not as 1e+06.
        "settings": {"maxQueuedJobs": 1000000, "rpcTimeoutS": 120.5},
    },
    # An external Ray cluster (no RayCluster), scraped by a ServiceMonitor, behind an Ingress.
    "external-ray": {
        "ray": {"address": "ray://ray-head.ray-system.svc:10001"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "tls": [{"secretName": "nd-ingress-tls", "hosts": ["neurodissect.example.com"]}],
        },
    },
    # Mutual TLS and the API token, both from values (the chart makes the Secrets).
    "tls-token": {
        "tls": {"enabled": True, "mutual": True, "cert": FAKE_PEM, "key": FAKE_KEY, "ca": FAKE_PEM},
        "auth": {"enabled": True, "token": "s3cret-token"},
        "ingress": {"enabled": True},
        "serviceMonitor": {"enabled": True},
    },
    # Everything from existing Secrets, external S3, a local Ray in the explainer pod, a data
    # volume and a GPU extractor; no MinIO, no dashboard, no ServiceAccount of the chart's.
    "existing-secrets-local-ray": {
        "minio": {"enabled": False},
        "store": {"endpoint": "seaweedfs.storage:8333", "secure": False, "existingSecret": "s3"},
        "auth": {"enabled": True, "existingSecret": "api-token"},
        "tls": {"enabled": True, "existingSecret": "nd-cert"},
        "ray": {"cluster": {"enabled": False}},
        "data": {"existingClaim": "probe-data"},
        "extractor": {"device": "cuda", "resources": {"limits": {"nvidia.com/gpu": 1}}},
        "grafanaDashboard": {"enabled": False},
        "serviceAccount": {"create": False},
    },
    # Sharded extraction over two extractor replicas, threads from the CPU limit.
    "extractor-replicas": {
        "extractor": {"replicas": 2, "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                                   "limits": {"cpu": "1500m", "memory": "8Gi"}}},
    },
}


# ----------------------------------------------------------------------------- rendering


@cache
def render(name: str) -> tuple[dict[str, str], tuple[dict[str, Any], ...]]:
    """Render value set `name`: (template path → text, parsed objects)."""
    return render_values(VALUE_SETS[name])


def render_values(values: dict[str, Any]) -> tuple[dict[str, str], tuple[dict[str, Any], ...]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects = tuple(
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    )
    return manifests, objects


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def workload(objects: tuple[dict[str, Any], ...], service: str) -> dict[str, Any]:
    """The Deployment of a service (the extractor's StatefulSet)."""
    kind = "StatefulSet" if service == "extractor" else "Deployment"
    return named(objects, kind, f"{FULLNAME}-{service}")


def cpu_cores(quantity: str) -> int:
    """A CPU quantity ("2", "1500m") in whole cores, rounded up as the downward API does."""
    return -(-int(quantity[:-1]) // 1000) if quantity.endswith("m") else int(quantity)


def pod_specs(objects: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template the chart renders, RayCluster head and worker groups included."""
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield where, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "RayCluster":
            yield f"{where}/head", obj["spec"]["headGroupSpec"]["template"]["spec"]
            for group in obj["spec"]["workerGroupSpecs"]:
                yield f"{where}/{group['groupName']}", group["template"]["spec"]


def neurodissect_containers(
    objects: tuple[dict[str, Any], ...],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container that runs the neurodissect image."""
    for where, spec in pod_specs(objects):
        for container in spec["containers"]:
            if container["image"].startswith("ghcr.io/neurodissect/neurodissect:"):
                yield f"{where}/{container['name']}", spec, container


def secret_data(objects: tuple[dict[str, Any], ...], name: str) -> dict[str, str] | None:
    """Decoded data of a Secret the chart renders, or None for a Secret it only refers to."""
    for secret in of_kind(objects, "Secret"):
        if secret["metadata"]["name"] == name:
            return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    return None


def container_env(objects: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps, then env (values and secret refs)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config = named(objects, "ConfigMap", source["configMapRef"]["name"])
        env.update(config["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "resourceFieldRef" in item["valueFrom"]:
            field = item["valueFrom"]["resourceFieldRef"]
            assert field["containerName"] == container["name"] and field["divisor"] == "1"
            kind, resource = field["resource"].split(".")
            env[item["name"]] = str(cpu_cores(container["resources"][kind][resource]))
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            data = secret_data(objects, ref["name"])
            if data is not None:
                assert ref["key"] in data, f"{item['name']}: no {ref['key']} in {ref['name']}"
                env[item["name"]] = data[ref["key"]]
            else:
                env[item["name"]] = f"<{ref['name']}/{ref['key']}>"
    return env


# ----------------------------------------------------------------------------- lint


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_passes_the_kubernetes_schemas(name: str, kube_version: str) -> None:
    _, objects = render(name)
    assert objects
    checked: list[tuple[str, dict[str, Any]]] = []
    custom = []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            custom.append(obj)
        else:
            checked.append((f"{obj['kind']}/{obj['metadata']['name']}", obj))
    # What of the custom resources is plain Kubernetes (the Ray pod templates) is validated too.
    for where, spec in pod_specs(tuple(custom)):
        template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": where.replace("/", "-").lower()},
                    "template": {"spec": spec}}
        checked.append((where, template))
    errors = []
    for where, obj in checked:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message[:300]}")
    assert errors == []


def test_custom_resources_are_the_expected_kinds() -> None:
    kinds = {name: {(o["apiVersion"], o["kind"]) for o in render(name)[1]} & CUSTOM_KINDS
             for name in VALUE_SETS}
    assert kinds["defaults"] == {("ray.io/v1", "RayCluster")}
    assert kinds["external-ray"] == {("monitoring.coreos.com/v1", "ServiceMonitor")}
    assert kinds["tls-token"] == CUSTOM_KINDS
    assert kinds["existing-secrets-local-ray"] == set()


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_no_pod_runs_as_root(name: str) -> None:
    _, objects = render(name)
    specs = list(pod_specs(objects))
    assert specs
    for where, spec in specs:
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, where
        assert pod.get("runAsUser", 0) >= 1000, where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container.get("securityContext", {})
            at = f"{where}/{container['name']}"
            assert ctx.get("runAsNonRoot", True) is True, at
            assert ctx.get("runAsUser", pod["runAsUser"]) >= 1000, at
            assert ctx.get("privileged", False) is False, at
            assert ctx.get("allowPrivilegeEscalation") is False, at
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), at
            assert not ctx.get("capabilities", {}).get("add"), at
            assert ctx.get("readOnlyRootFilesystem") is True, at
            # A read-only root needs a writable /tmp.
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], at


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_service_pods_have_grpc_health_probes_and_resources(name: str) -> None:
    values = VALUE_SETS[name]
    tls = values.get("tls", {}).get("enabled", False)
    _, objects = render(name)
    for service in SERVICES:
        deployment = workload(objects, service)
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["args"] == ["serve", service]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        web_ui = {"ui": Settings().ui_port} if service == "gateway" else {}
        assert ports == {
            "grpc": DEFAULT_PORTS[service], "metrics": DEFAULT_METRICS_PORTS[service], **web_ui
        }
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container[probe]
            if tls:  # the kubelet's gRPC probe cannot speak TLS
                assert check["tcpSocket"] == {"port": "grpc"}, (service, probe)
                assert "grpc" not in check
            else:
                assert check["grpc"] == {"port": ports["grpc"]}, (service, probe)
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], service
        assert resources["limits"]["memory"], service
        # The cache directory the settings name is a writable volume.
        env = container_env(objects, container)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["NEURODISSECT_CACHE_DIR"] in mounts
    gateway = named(objects, "Deployment", f"{FULLNAME}-gateway")["spec"]
    assert gateway["replicas"] == 1 and gateway["strategy"]["type"] == "Recreate"


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_env_names_are_settings_fields(name: str) -> None:
    _, objects = render(name)
    containers = list(neurodissect_containers(objects))
    assert len(containers) >= len(SERVICES)
    for where, _, container in containers:
        unknown = set(container_env(objects, container)) - SETTINGS_ENV - RAY_ENV
        assert not unknown, f"{where} sets variables no Settings field reads: {sorted(unknown)}"


def test_value_sets_together_set_every_settings_field() -> None:
    seen: set[str] = set()
    for name in VALUE_SETS:
        _, objects = render(name)
        for _, _, container in neurodissect_containers(objects):
            seen |= set(container_env(objects, container))
    assert seen - RAY_ENV == SETTINGS_ENV


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_settings_load_and_wire_the_services_together(name: str) -> None:
    values = VALUE_SETS[name]
    _, objects = render(name)
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    for service in SERVICES:
        deployment = workload(objects, service)
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        env = container_env(objects, container)
        settings = Settings.load(env)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert settings.host == "0.0.0.0"
        assert settings.service_port(service) == ports["grpc"]
        assert settings.service_metrics_port(service) == ports["metrics"]
        # Every peer address is a rendered Service whose grpc port selects that peer's pods.
        for peer in SERVICES:
            host, port = settings.address_of(peer).rsplit(":", 1)
            svc = services[host]
            (grpc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc_port["port"] == int(port)
            peer_pod = workload(objects, peer)["spec"]["template"]
            assert svc["spec"]["selector"].items() <= peer_pod["metadata"]["labels"].items()
        # The object store.
        store = values.get("store", {})
        assert settings.store_url.startswith(f"s3://{store.get('bucket', 'neurodissect')}")
        if values.get("minio", {}).get("enabled", True):
            assert settings.s3_endpoint == f"{FULLNAME}-minio:9000"
            assert f"{FULLNAME}-minio" in services and settings.s3_secure is False
        else:
            assert settings.s3_endpoint == store["endpoint"]
            assert settings.s3_secure is store["secure"]
        assert settings.s3_access_key and settings.s3_secret_key
        # The token, only where asked for.
        assert bool(settings.auth_token) is values.get("auth", {}).get("enabled", False)
        # TLS files are mounted from a Secret that holds them.
        tls = values.get("tls", {})
        if tls.get("enabled"):
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            files = [settings.tls_cert, settings.tls_key]
            files += [settings.tls_ca] if tls.get("mutual") else []
            for path in files:
                secret = volumes[mounts[posixpath.dirname(path)]]["secret"]["secretName"]
                data = secret_data(objects, secret)
                assert data is None or posixpath.basename(path) in data, path
            assert bool(settings.tls_ca) is bool(tls.get("mutual"))
        else:
            assert not (settings.tls_cert or settings.tls_key or settings.tls_ca)
        # Ray: only the explainer is a Ray driver.
        if service != "explainer":
            assert "RAY_ADDRESS" not in env


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_extractor_replicas_are_addressed_one_by_one(name: str) -> None:
    extractor_values = VALUE_SETS[name].get("extractor", {})
    replicas = extractor_values.get("replicas", 1)
    _, objects = render(name)
    statefulset = workload(objects, "extractor")["spec"]
    assert statefulset["replicas"] == replicas
    headless = named(objects, "Service", statefulset["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    pod = statefulset["template"]
    assert headless["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (grpc_port,) = [p for p in headless["spec"]["ports"] if p["name"] == "grpc"]
    gateway = workload(objects, "gateway")["spec"]["template"]["spec"]["containers"][0]
    settings = Settings.load(container_env(objects, gateway))
    # A StatefulSet's pod k is <name>-k; under its headless Service: <pod>.<service>.<ns>.svc.
    expected = [
        f"{FULLNAME}-extractor-{k}.{headless['metadata']['name']}.{NAMESPACE}.svc:"
        f"{grpc_port['port']}" for k in range(replicas)
    ] if replicas > 1 else [settings.extractor_addr]
    assert settings.extractor_addresses() == expected
    # Threads: the value, else the CPU limit (or request) in whole cores.
    (container,) = pod["spec"]["containers"]
    threads = int(container_env(objects, container)["NEURODISSECT_TORCH_THREADS"])
    resources = container["resources"]
    cpu = resources.get("limits", {}).get("cpu") or resources["requests"]["cpu"]
    assert threads == (extractor_values.get("torchThreads") or cpu_cores(cpu))
    if name == "extractor-replicas":
        assert threads == 2  # 1500m rounded up


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_explainer_ray_address(name: str) -> None:
    values = VALUE_SETS[name]
    _, objects = render(name)
    explainer = workload(objects, "explainer")
    env = container_env(objects, explainer["spec"]["template"]["spec"]["containers"][0])
    clusters = of_kind(objects, "RayCluster")
    if values.get("ray", {}).get("address"):
        assert env["RAY_ADDRESS"] == values["ray"]["address"]
        assert clusters == []
    elif values.get("ray", {}).get("cluster", {}).get("enabled", True):
        (cluster,) = clusters
        # KubeRay names the head's Service <cluster>-head-svc; the explainer is a Ray client.
        head_svc = f"{cluster['metadata']['name']}-head-svc"
        assert env["RAY_ADDRESS"] == f"ray://{head_svc}:10001"
        head = cluster["spec"]["headGroupSpec"]
        assert head["rayStartParams"]["ray-client-server-port"] == "10001"
        (head_container,) = head["template"]["spec"]["containers"]
        assert {"name": "client", "containerPort": 10001} in head_container["ports"]
        assert cluster["spec"]["workerGroupSpecs"]
        assert cluster["spec"]["rayVersion"] == "2.60.0"
    else:
        assert "RAY_ADDRESS" not in env  # a local Ray in the explainer pod
        assert clusters == []


# ----------------------------------------------------------------------------- objects


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_secret_references_resolve(name: str) -> None:
    """Every Secret a pod refers to is rendered by the chart or named as an existing one."""
    values = VALUE_SETS[name]
    _, objects = render(name)
    rendered = {s["metadata"]["name"] for s in of_kind(objects, "Secret")}
    existing = {values.get(k, {}).get("existingSecret") for k in ("store", "auth", "tls")} - {None}
    for ingress in of_kind(objects, "Ingress"):
        existing |= {t["secretName"] for t in ingress["spec"].get("tls", [])}
    for where, spec in pod_specs(objects):
        refs = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for container in spec["containers"]:
            refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                     if "secretKeyRef" in e.get("valueFrom", {})}
        assert refs <= rendered | existing, where
    assert (f"{FULLNAME}-s3" in rendered) is not values.get("store", {}).get("existingSecret")


def test_minio_statefulset_and_bucket_job() -> None:
    _, objects = render("defaults")
    minio = named(objects, "StatefulSet", f"{FULLNAME}-minio")
    (claim,) = minio["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert named(objects, "Service", f"{FULLNAME}-minio")["spec"]["ports"][0]["port"] == 9000
    job = named(objects, "Job", f"{FULLNAME}-minio-bucket")
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    assert "store/neurodissect" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    _, external = render("external-s3")
    assert not [o for o in external if "minio" in o["metadata"]["name"]]


def test_service_monitor_scrapes_the_metrics_ports() -> None:
    _, objects = render("external-ray")
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in of_kind(objects, "Service")
                if selector.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {f"{FULLNAME}-{s}" for s in SERVICES}
    (endpoint,) = monitor["spec"]["endpoints"]
    for svc in selected:
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # Same labels as deploy/prometheus/prometheus.yml: job="neurodissect", service=<component>.
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == "neurodissect"
    assert relabel["service"]["sourceLabels"] == [
        "__meta_kubernetes_service_label_app_kubernetes_io_component"]
    assert endpoint["honorLabels"] is True


def dashboard_configmaps(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [config for config in of_kind(objects, "ConfigMap")
            if config["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_configmap_holds_the_dashboard_file() -> None:
    _, objects = render("defaults")
    (config,) = dashboard_configmaps(objects)
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (CHART / "dashboards" / "neurodissect.json").read_text()
    assert config["data"]["neurodissect.json"] == text.rstrip("\n")
    assert json.loads(config["data"]["neurodissect.json"])["uid"] == "neurodissect"
    # deploy/grafana holds the same file (a link to the chart's copy).
    assert (ROOT / "deploy" / "grafana" / "neurodissect.json").read_text() == text
    _, without = render("existing-secrets-local-ray")
    assert dashboard_configmaps(without) == []


@pytest.mark.parametrize(("name", "protocol"), [("external-ray", "GRPC"), ("tls-token", "GRPCS")])
def test_ingress_routes_grpc_to_the_gateway(name: str, protocol: str) -> None:
    _, objects = render(name)
    (ingress,) = of_kind(objects, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == protocol
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-gateway", "port": {"name": "grpc"}}


def test_chart_made_secrets_hold_the_given_values() -> None:
    _, objects = render("tls-token")
    assert secret_data(objects, f"{FULLNAME}-auth") == {"token": "s3cret-token"}
    assert secret_data(objects, f"{FULLNAME}-tls") == {"tls.crt": FAKE_PEM, "tls.key": FAKE_KEY,
                                                        "ca.crt": FAKE_PEM}
    # Without given keys, MinIO gets random credentials, never empty ones.
    _, defaults = render("defaults")
    keys = secret_data(defaults, f"{FULLNAME}-s3")
    assert keys is not None and all(len(v) >= 16 for v in keys.values())


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_gateway_service_exposes_the_web_ui(name: str) -> None:
    manifests, objects = render(name)
    ports = named(objects, "Service", f"{FULLNAME}-gateway")["spec"]["ports"]
    assert {"name": "ui", "port": 8080, "targetPort": "ui", "protocol": "TCP",
            "appProtocol": "http"} in ports
    container = workload(objects, "gateway")["spec"]["template"]["spec"][
        "containers"][0]
    assert {"name": "ui", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert {"name": "NEURODISSECT_UI_PORT", "value": "8080"} in container["env"]
    for other in ("extractor", "explainer", "captioner"):
        service = named(objects, "Service", f"{FULLNAME}-{other}")
        assert "ui" not in [p["name"] for p in service["spec"]["ports"]]
    notes = manifests["neurodissect/templates/NOTES.txt"]
    assert f"port-forward svc/{FULLNAME}-gateway 8080:8080" in notes


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_notes_tell_how_to_submit_a_job(name: str) -> None:
    manifests, _ = render(name)
    notes = manifests["neurodissect/templates/NOTES.txt"]
    assert f"port-forward svc/{FULLNAME}-gateway 50051:50051" in notes
    assert "neurodissect submit" in notes
    for var in re.findall(r"export (\w+)=", notes):
        assert var in SETTINGS_ENV, var
    token = VALUE_SETS[name].get("auth", {}).get("enabled", False)
    assert ("NEURODISSECT_AUTH_TOKEN" in notes) is token


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"store": {"endpoint": "s3.example.com:443"}}, "minio.enabled"),
        ({"minio": {"enabled": False}, "store": {"accessKey": "a", "secretKey": "b"}},
         "store.endpoint"),
        ({"minio": {"enabled": False}, "store": {"endpoint": "s3.example.com:443"}},
         "store.accessKey"),
        ({"tls": {"enabled": True}}, "tls.cert"),
        ({"tls": {"enabled": True, "mutual": True, "cert": FAKE_PEM, "key": FAKE_KEY}}, "tls.ca"),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render_values(values)


# ----------------------------------------------------------------------------- values.yaml


def test_every_value_is_documented() -> None:
    """Each leaf of values.yaml has a comment above it (fields of list items excepted)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    list_indent = None
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if list_indent is not None and indent <= list_indent and not stripped.startswith("- "):
            list_indent = None
        if stripped.startswith("- "):
            list_indent = indent if list_indent is None else min(list_indent, indent)
            continue
        if list_indent is not None:
            continue
        key, _, value = stripped.partition(":")
        if not value.strip() or value.strip().startswith("#"):
            continue  # a mapping whose own leaves are checked
        above = lines[number - 1].strip() if number else ""
        if not above.startswith("#") and "#" not in value:
            undocumented.append(key)
    assert undocumented == []
