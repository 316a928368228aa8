"""Kubernetes manifests: every kustomize overlay renders (``kubectl kustomize``), validates
offline against the Kubernetes 1.30 schemas (``kubernetes-validate --strict``), and agrees with
the code in what the schemas cannot see: ports, probes, env var names, selectors, grace."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from decoder_service.cli import DecoderSettings
from decoder_service.servicer import SERVICE_NAME as DECODER_SERVICE
from encoder_service.cli import EncoderSettings
from encoder_service.servicer import SERVICE_NAME as ENCODER_SERVICE
from sam2_shared.serving.auth import check_listener_auth
from sam2_shared.serving.settings import env_name, load_settings
from tests.helpers import REPO_ROOT
from tests.helpers.container_images import built_image_names

K8S = REPO_ROOT / "k8s"
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu"]
PRESTOP_SLEEP_S = 5
# Environment variables read outside the settings classes.
EXTRA_SAM2_ENV = {"SAM2_CHECKPOINT_DIR"}  # sam2_shared/checkpoints.py
TIERS = {
    "sam2-encoder": {"settings": EncoderSettings, "service": ENCODER_SERVICE,
                     "command": "sam2-encoder"},
    "sam2-decoder": {"settings": DecoderSettings, "service": DECODER_SERVICE,
                     "command": "sam2-decoder"},
}


def default(settings: type, name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(settings)}[name]


def env_names(settings: type) -> set[str]:
    return {env_name(f) for f in dataclasses.fields(settings)}


def render(overlay: str) -> list[dict]:
    """The documents ``kubectl kustomize k8s/<overlay>`` prints."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not installed (kustomize is built in): CI must have it")
    output = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], check=True,
                            capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def containers_of(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, container) for every container of every Deployment / StatefulSet."""
    return [(doc, container) for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")
            for container in doc["spec"]["template"]["spec"]["containers"]]


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """Literal env of a container: its ConfigMaps and Secrets (envFrom), then ``env``."""
    configmaps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            values.update(configmaps[source["configMapRef"]["name"]]["data"])
        else:
            values.update(secrets[source["secretRef"]["name"]].get("stringData", {}))
    for item in container.get("env", []):
        values[item["name"]] = item.get("value", "<from>")
    return values


def test_every_document_validates_against_the_schemas(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "Secret",
            "ServiceMonitor"} <= kinds, name
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: no schema here; checked in test_service_monitor_...
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_validation_rejects_a_broken_manifest(rendered: tuple[str, list[dict]]) -> None:
    """The validator is not a no-op: an unknown field and a wrong type both fail."""
    deployment = dict(by_kind(rendered[1], "Deployment")["sam2-encoder"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deployment, "spec": {**deployment["spec"], "replica": 2}},
                                     KUBERNETES_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deployment, "spec": {**deployment["spec"],
                                                             "replicas": "two"}},
                                     KUBERNETES_VERSION, strict=True)


def test_ports_probes_and_commands_match_the_code(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == set(TIERS), name
    for deployment_name, tier in TIERS.items():
        settings = tier["settings"]
        (container,) = deployments[deployment_name]["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = container_env(docs, container)
        # HTTP is off by default in the code and on in the manifests.
        assert default(settings, "http_port") is None
        assert ports == {"grpc": default(settings, "port"),
                         "metrics": default(settings, "metrics_port"),
                         "http": int(env["SAM2_HTTP_PORT"])}, deployment_name
        assert int(env["SAM2_PORT"]) == ports["grpc"]
        assert int(env["SAM2_METRICS_PORT"]) == ports["metrics"]
        assert container["command"] == [tier["command"]]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": ports["grpc"],
                                                "service": tier["service"]}, (name, probe)


def test_env_var_names_exist_in_the_settings(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    for workload, container in containers_of(docs):
        tier = TIERS.get(workload["metadata"]["name"])
        if tier is None:
            continue
        known = env_names(tier["settings"]) | EXTRA_SAM2_ENV
        used = {key for key in container_env(docs, container) if key.startswith("SAM2_")}
        assert used - known == set(), (name, workload["metadata"]["name"])
        assert {"SAM2_MODEL", "SAM2_STORE", "SAM2_GRACE_S"} <= used


def test_tiers_listen_publicly_only_with_the_api_keys_secret(
        rendered: tuple[str, list[dict]]) -> None:
    """The settings a tier parses from its manifest pass the start-up check (closed by
    default): the pods listen on 0.0.0.0, so their keys come from the mounted Secret."""
    name, docs = rendered
    for deployment_name, tier in TIERS.items():
        spec = by_kind(docs, "Deployment")[deployment_name]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = container_env(docs, container)
        settings = load_settings(tier["settings"], [], env=env)
        check_listener_auth(settings.host, settings.api_keys_file,
                            settings.allow_unauthenticated)
        assert settings.api_keys_file and not settings.allow_unauthenticated, name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts[settings.api_keys_file]]["secret"]["secretName"] == \
            "sam2-api-keys"


def test_env_checker_catches_an_unknown_name() -> None:
    assert "SAM2_MAX_BATCH_SIZE" in env_names(EncoderSettings)
    assert "SAM2_MAX_BATCH" not in env_names(EncoderSettings)
    assert "SAM2_HOT_CACHE_MB" not in env_names(EncoderSettings)


def test_grace_periods_allow_the_drain(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    for deployment_name, tier in TIERS.items():
        spec = by_kind(docs, "Deployment")[deployment_name]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        grace_s = float(container_env(docs, container).get(
            "SAM2_GRACE_S", default(tier["settings"], "grace_s")))
        sleep_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep_s == PRESTOP_SLEEP_S
        # SIGTERM comes after preStop; the server then drains for grace_s; SIGKILL comes at
        # terminationGracePeriodSeconds: leave a few seconds for close callbacks.
        assert sleep_s + grace_s + 5 <= spec["terminationGracePeriodSeconds"], name


def test_selectors_match_pod_labels_and_hpa_targets_exist(
        rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    workloads = {d["metadata"]["name"]: d for d in docs
                 if d["kind"] in ("Deployment", "StatefulSet")}
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads.values()]

    def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    for workload in workloads.values():
        assert matches(workload["spec"]["selector"]["matchLabels"],
                       workload["spec"]["template"]["metadata"]["labels"])
    for service in by_kind(docs, "Service").values():
        selected = [labels for labels in pod_labels if matches(service["spec"]["selector"],
                                                               labels)]
        assert len(selected) == 1, (name, service["metadata"]["name"])
        assert service["spec"]["clusterIP"] == "None"  # headless: client-side round robin
    for pdb in by_kind(docs, "PodDisruptionBudget").values():
        assert any(matches(pdb["spec"]["selector"]["matchLabels"], labels)
                   for labels in pod_labels), pdb["metadata"]["name"]
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == set(TIERS)
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in workloads
    encoder_metric = hpas["sam2-encoder"]["spec"]["metrics"][0]
    assert encoder_metric["pods"]["metric"]["name"] == "sam2_encoder_queue_depth"
    docs_text = (REPO_ROOT / "docs" / "metrics.md").read_text()
    assert "`sam2_encoder_queue_depth`" in docs_text  # the HPA's metric is a real one
    assert hpas["sam2-decoder"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    statefulset = workloads["sam2-redis"]
    assert statefulset["spec"]["serviceName"] in by_kind(docs, "Service")


def test_service_monitor_names_existing_service_ports(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    namespace = {d["metadata"].get("namespace") for d in docs if d["kind"] == "Service"}
    assert spec["namespaceSelector"]["matchNames"] == sorted(namespace)

    def selected(service: dict) -> bool:
        labels = service["metadata"]["labels"]
        return all(labels.get(e["key"]) in e["values"] and e["operator"] == "In"
                   for e in spec["selector"]["matchExpressions"])

    services = [s for s in by_kind(docs, "Service").values() if selected(s)]
    assert sorted(s["metadata"]["name"] for s in services) == sorted(TIERS), name
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"])
        for service in services:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_security_context_everywhere(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    for workload, container in containers_of(docs):
        pod = workload["spec"]["template"]["spec"]
        label = (name, workload["metadata"]["name"])
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert pod["securityContext"]["runAsUser"] > 0, label
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, label
        assert pod["automountServiceAccountToken"] is False, label
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, label
        assert security["allowPrivilegeEscalation"] is False, label
        assert security["capabilities"]["drop"] == ["ALL"], label
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if workload["metadata"]["name"] in TIERS:
            assert {"/tmp", "/var/cache/sam2"} <= mounts, label
            assert container_env(docs, container)["SAM2_CHECKPOINT_DIR"] == "/var/cache/sam2"
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["memory"] == requests["memory"], label  # no memory overcommit


def test_network_policies_isolate_encoder_and_store(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    policies = by_kind(docs, "NetworkPolicy")
    assert policies["sam2-default-deny-ingress"]["spec"] == {"podSelector": {},
                                                            "policyTypes": ["Ingress"]}
    encoder_from = policies["sam2-encoder-ingress"]["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "decoder"}}} \
        in encoder_from
    assert all("sam2.io/client" in str(peer) or "decoder" in str(peer) for peer in encoder_from)
    for tier in ("encoder", "decoder"):  # the gRPC port and the same API over HTTP
        ports = policies[f"sam2-{tier}-ingress"]["spec"]["ingress"][0]["ports"]
        assert [p["port"] for p in ports] == ["grpc", "http"]
    redis_from = policies["sam2-redis-ingress"]["spec"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": {"matchExpressions": [
        {"key": "app.kubernetes.io/component", "operator": "In",
         "values": ["encoder", "decoder"]}]}}]


def test_redis_is_a_bounded_lru(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    config = by_kind(docs, "ConfigMap")
    (redis_conf,) = [c["data"]["redis.conf"] for c in config.values()
                     if "redis.conf" in c.get("data", {})]
    settings = dict(line.split(None, 1) for line in redis_conf.splitlines()
                    if line and not line.startswith("#"))
    assert settings["maxmemory-policy"] == "allkeys-lru"
    maxmemory_gib = int(settings["maxmemory"].removesuffix("gb"))
    (workload,) = [w for w in docs if w["metadata"]["name"] == "sam2-redis"
                   and w["kind"] == "StatefulSet"]
    limit = workload["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert maxmemory_gib * 1024 < int(limit["memory"].removesuffix("Mi"))


def test_gpu_overlay_puts_the_encoder_on_gpu_nodes() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    output = subprocess.run([kubectl, "kustomize", str(K8S / "overlays/gpu")], check=True,
                            capture_output=True, text=True, timeout=60).stdout
    docs = [doc for doc in yaml.safe_load_all(output) if doc]
    deployments = by_kind(docs, "Deployment")
    encoder = deployments["sam2-encoder"]["spec"]["template"]["spec"]
    (container,) = encoder["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in encoder["tolerations"]
    env = container_env(docs, container)
    assert env["SAM2_DEVICE"] == "cuda"
    assert [e["name"] for e in container["env"]].count("SAM2_DEVICE") == 1
    decoder = deployments["sam2-decoder"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in decoder["containers"][0]["resources"]["limits"]
    assert "tolerations" not in decoder


# --------------------------------------------------------------------------- images, compose


def test_manifests_and_compose_run_the_images_the_build_makes(
        rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    images = {container["image"] for workload, container in containers_of(docs)
              if workload["metadata"]["name"] in TIERS}
    assert images and images <= set(built_image_names().values()), name
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    assert compose["x-tier"]["image"] in built_image_names().values()


# Values that differ between the stacks by design: where each finds its neighbours, and how
# each admits clients (compose: loopback only, no keys; k8s: the API-keys Secret).
PER_STACK_ENV = {"SAM2_STORE", "SAM2_ENCODER_ADDRESS", "SAM2_ALLOW_UNAUTHENTICATED",
                 "SAM2_API_KEYS_FILE"}


def healthcheck_of(dockerfile: str) -> dict[str, str]:
    """The runtime stage's HEALTHCHECK options (``--interval`` ...) and its port default."""
    text = (REPO_ROOT / "docker" / dockerfile).read_text().replace("\\\n", " ")
    line = re.search(r"^HEALTHCHECK (.*)$", text, re.MULTILINE)
    assert line, dockerfile
    options = dict(re.findall(r"--([\w-]+)=(\S+)", line.group(1)))
    port = re.search(r'CMD python /opt/healthcheck.py "\$\{SAM2_PORT:-(\d+)\}"$', line.group(1))
    assert port, line.group(1)
    return {**options, "port": port.group(1)}


def seconds(duration: str) -> int:
    return int(duration.removesuffix("s"))


def test_compose_and_the_cpu_manifests_agree_on_ports_env_and_probes() -> None:
    """compose.yaml is the CPU overlay in one file: same ports, a subset of the same env
    names with the same values (PER_STACK_ENV aside), and the image's own health check probes
    the port and within the times the Kubernetes probes use."""
    docs = render("overlays/cpu")
    deployments = by_kind(docs, "Deployment")
    services = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())["services"]
    for deployment_name in TIERS:
        tier = deployment_name.removeprefix("sam2-")
        (container,) = deployments[deployment_name]["spec"]["template"]["spec"]["containers"]
        k8s_env, compose_env = container_env(docs, container), services[tier]["environment"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(compose_env["SAM2_PORT"]) == ports["grpc"]
        assert int(compose_env["SAM2_METRICS_PORT"]) == ports["metrics"]
        assert set(compose_env) - set(k8s_env) <= PER_STACK_ENV, tier
        assert {key: compose_env[key] for key in set(compose_env) - PER_STACK_ENV} == {
            key: k8s_env[key] for key in set(compose_env) - PER_STACK_ENV}, tier
        assert "healthcheck" not in services[tier]  # the image's own, checked below
        # Both images' checks: the tier's port by default, SAM2_PORT (set here) when given.
        for dockerfile in ("encoder.Dockerfile", "decoder.Dockerfile"):
            check = healthcheck_of(dockerfile)
            if dockerfile.startswith(tier):
                assert int(check["port"]) == ports["grpc"], dockerfile
            liveness, startup = container["livenessProbe"], container["startupProbe"]
            assert seconds(check["interval"]) == liveness["periodSeconds"]
            assert seconds(check["timeout"]) == liveness["timeoutSeconds"]
            assert seconds(check["start-period"]) <= (startup["periodSeconds"]
                                                      * startup["failureThreshold"])
