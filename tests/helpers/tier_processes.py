"""The real tiers as subprocesses on 127.0.0.1 (``python -m encoder_service`` etc.).

Each is started with ``--port 0``; the port comes from the ``SAM2_LISTENING port=N`` line the
CLIs print, and ``start`` returns once gRPC health reports SERVING (model loaded and warm).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import REPO_ROOT

_LISTENING = re.compile(rb"SAM2_LISTENING port=(\d+)")
_HTTP_LISTENING = re.compile(rb"SAM2_HTTP_LISTENING port=(\d+)")


class TierProcess:
    """One tier's CLI as a subprocess.

    Arguments:
        module (str): ``"encoder_service"`` or ``"decoder_service"``.
        args (list[str]): extra flags (model, checkpoint, store...).
        env (dict[str, str] | None): extra environment variables (e.g. AWS credentials).
        startup_timeout_s (float): how long loading and warm-up may take.
    """

    def __init__(self, module: str, args: list[str], env: dict[str, str] | None = None,
                 startup_timeout_s: float = 180.0) -> None:
        self.module = module
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{module}-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port = 0  # with --http-port: the HTTP (Connect, gRPC-Web) port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        assert self.http_port, f"{self.module} was started without --http-port"
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> TierProcess:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                           env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "2")
        command = [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--grace-s", "2", *self.args]
        with (self.workdir / "stdout").open("wb") as out, (self.workdir / "log").open("wb") as log:
            self.process = subprocess.Popen(command, stdout=out, stderr=log, cwd=self.workdir,
                                            env=env)
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.port:
            self._check_alive(deadline)
            found = _LISTENING.search((self.workdir / "stdout").read_bytes())
            if found:
                self.port = int(found.group(1))
            else:
                time.sleep(0.05)
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(deadline)
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        # Printed right after the gRPC line, long before SERVING.
                        found = _HTTP_LISTENING.search((self.workdir / "stdout").read_bytes())
                        self.http_port = int(found.group(1)) if found else 0
                        return self
                except grpc.RpcError:
                    pass
                time.sleep(0.1)

    def _check_alive(self, deadline: float) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n"
                               f"{self.log_tail()}")
        if time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"{self.module} not serving after {self.startup_timeout_s} s:\n"
                               f"{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM (graceful), SIGKILL after 20 s; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def memory_mib(self, field: str = "VmHWM") -> float:
        """``VmHWM`` (peak resident set since start or ``reset_peak_memory``) or ``VmRSS``
        (resident now) of the running process, in MiB, from ``/proc/<pid>/status``."""
        assert self.process is not None and self.process.poll() is None, f"{self.module} died"
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
        raise RuntimeError(f"no {field} in /proc/{self.process.pid}/status")

    def reset_peak_memory(self) -> float:
        """Set ``VmHWM`` back to the resident set now (``5`` to ``/proc/<pid>/clear_refs``),
        so the next ``memory_mib()`` is the peak of what happens in between; returns it."""
        assert self.process is not None
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self.memory_mib("VmHWM")

    def log_tail(self, nbytes: int = 4000) -> str:
        path = self.workdir / "log"
        return path.read_bytes()[-nbytes:].decode(errors="replace") if path.exists() else ""

    def __enter__(self) -> TierProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def encoder_process(checkpoint: Path, store: str, *extra: str,
                    env: dict[str, str] | None = None) -> TierProcess:
    return TierProcess("encoder_service", ["--model", "sam2.1/hiera_tiny", "--checkpoint",
                                           str(checkpoint), "--store", store, *extra], env)


def decoder_process(checkpoint: Path, store: str, *extra: str,
                    env: dict[str, str] | None = None) -> TierProcess:
    """A decoder tier whose upscaling runs in float32 unless ``extra`` says otherwise: the
    tests compare its answers with the in-process float32 model's exactly, and its default
    (``auto``) is bfloat16 on CPUs with native bf16 (``test_upscaling_dtype.py`` checks it)."""
    return TierProcess("decoder_service", ["--model", "sam2.1/hiera_tiny", "--checkpoint",
                                           str(checkpoint), "--store", store,
                                           *exact_upscaling(extra), *extra], env)


def exact_upscaling(extra: Sequence[str]) -> list[str]:
    """``--upscaling-dtype float32`` unless ``extra`` names one (see ``decoder_process``)."""
    return [] if "--upscaling-dtype" in extra else ["--upscaling-dtype", "float32"]
