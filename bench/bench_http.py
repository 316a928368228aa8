"""One click over HTTP (Connect JSON, Connect binary, gRPC-Web) next to the same click over
gRPC, on one decoder; optionally our HTTP layer next to connect-python's on a fixed answer.

Tiers (default): starts the encoder and a decoder with ``--http-port`` (real CLIs, loopback,
diskcache store in a temp dir), embeds one 1920x1080 image, then sends the same one-point
multimask ``Segment`` (COCO RLE) over each protocol in turn, ``--requests`` rounds, one call
at a time, each protocol on its own kept-alive connection, and reports p50 / p90 / mean of the
round trip (request encoded to answer decoded: JSON parsed with ``json.loads``).

Layers (``--layers``): both HTTP layers answer that click's recorded answer (no model), ours
(``build_server(http_port=...)`` with a servicer returning it) and connect-python's ASGI
application under uvicorn (``pip install connect-python==0.9.0
protoc-gen-connect-python==0.9.0 uvicorn==0.54.0``; not a dependency of the project), to
measure what the protocol layer alone costs per click.

    python bench/bench_http.py [--checkpoint PATH] [--requests 200] [--layers]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_shared.api.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc  # noqa: E402
from sam2_shared.client import Sam2Client  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402
from tests.helpers.http_rpc import HttpRpcClient  # noqa: E402
from tests.helpers.scratch import use_scratch_tempdir  # noqa: E402
from tests.helpers.synthetic_images import synthetic_rgb  # noqa: E402
from tests.helpers.tier_processes import TierProcess  # noqa: E402

MODEL_ID = "sam2.1/hiera_tiny"
HEIGHT, WIDTH = 1080, 1920
SEGMENT = "/sam2.v1.DecoderService/Segment"


def click(embedding_id: str) -> decoder_pb2.SegmentRequest:
    point = common_pb2.Point(x_px=900, y_px=560, label=common_pb2.POINT_LABEL_FOREGROUND)
    return decoder_pb2.SegmentRequest(embedding_id=embedding_id,
                                      prompts=[decoder_pb2.Prompt(points=[point])])


def http_callers(base_url: str, request: decoder_pb2.SegmentRequest
                 ) -> dict[str, Callable[[], object]]:
    """One kept-alive connection per protocol; each caller returns the decoded answer."""
    json_client, proto_client, web_client = (HttpRpcClient(base_url) for _ in range(3))

    def connect_json() -> object:
        reply = json_client.connect_json(SEGMENT, request)
        assert reply.status == 200, reply.body[:300]
        return json.loads(reply.body)

    def connect_proto() -> object:
        reply = proto_client.connect_proto(SEGMENT, request)
        assert reply.status == 200, reply.body[:300]
        return decoder_pb2.SegmentResponse.FromString(reply.body)

    def grpc_web() -> object:
        _, [message], trailers = web_client.grpc_web(SEGMENT, request)
        assert trailers["grpc-status"] == "0", trailers
        return decoder_pb2.SegmentResponse.FromString(message)

    return {"Connect, JSON": connect_json, "Connect, binary": connect_proto,
            "gRPC-Web, binary": grpc_web}


def interleaved(callers: dict[str, Callable[[], object]], rounds: int
                ) -> dict[str, list[float]]:
    """``rounds`` calls of each, in turn (drift on a shared machine hits all alike)."""
    for call in callers.values():  # warm connections and caches
        for _ in range(5):
            call()
    times: dict[str, list[float]] = {name: [] for name in callers}
    for _ in range(rounds):
        for name, call in callers.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def report(title: str, times: dict[str, list[float]], baseline: str) -> None:
    print(f"\n{title}")
    base = float(np.percentile(times[baseline], 50)) * 1000
    print(f"{'protocol':28} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8} {'p50 - ' + baseline:>22}")
    for name, samples in times.items():
        ms = np.asarray(samples) * 1000
        p50 = float(np.percentile(ms, 50))
        print(f"{name:28} {p50:8.2f} {np.percentile(ms, 90):8.2f} {ms.mean():8.2f} "
              f"{p50 - base:+22.2f}")


def bench_tiers(checkpoint: Path, rounds: int) -> tuple[decoder_pb2.SegmentRequest,
                                                         decoder_pb2.SegmentResponse]:
    """Times the protocols on real tiers; returns the click and its answer."""
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-bench-http-")
    common = ["--model", MODEL_ID, "--checkpoint", str(checkpoint), "--store", store]
    with TierProcess("encoder_service", common) as encoder:
        with Sam2Client(encoder=encoder.address, model_id=MODEL_ID) as client:
            [ref] = client.embed_images(synthetic_rgb(HEIGHT, WIDTH), input_color_format="rgb")
    request = click(ref.embedding_id)
    with TierProcess("decoder_service", [*common, "--http-port", "0"]) as decoder, \
            grpc.insecure_channel(decoder.address) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        callers = {"gRPC": lambda: stub.Segment(request, timeout=120),
                   **http_callers(decoder.http_url, request)}
        times = interleaved(callers, rounds)
        answer = stub.Segment(request, timeout=120)
    report(f"{MODEL_ID}, one point, multimask (3 masks), {WIDTH}x{HEIGHT}, COCO RLE, "
           f"{rounds} rounds, one call at a time, loopback", times, "gRPC")
    return request, answer


# --- layers alone, on a recorded answer -----------------------------------------------

# Each layer runs in a process of its own (as in production), answering the recorded click.
OURS_APP = '''
import asyncio, sys
sys.path.insert(0, {repo!r})
from sam2_shared.api.v1 import decoder_pb2, decoder_pb2_grpc
from sam2_shared.serving.server import build_server
ANSWER = decoder_pb2.SegmentResponse.FromString(open({answer!r}, "rb").read())

class Recorded(decoder_pb2_grpc.DecoderServiceServicer):
    async def Segment(self, request, context):
        return ANSWER

async def main():
    servicer = Recorded()
    server, _ = build_server(
        [lambda s: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(servicer, s)],
        ["sam2.v1.DecoderService"], port=0, host="127.0.0.1", http_port={port})
    await server.start()
    await server.serve()

asyncio.run(main())
'''

CONNECT_PYTHON_APP = '''
import sys
sys.path.insert(0, {gen!r}); sys.path.insert(0, {repo!r})
from sam2c.decoder_connect import DecoderServiceASGIApplication
from sam2_shared.api.v1 import decoder_pb2
ANSWER = decoder_pb2.SegmentResponse.FromString(open({answer!r}, "rb").read())

class Recorded:
    async def segment(self, request, ctx):
        return ANSWER

    async def segment_stream(self, requests, ctx):
        async for _ in requests:
            yield decoder_pb2.SegmentStreamResponse(segment=ANSWER)

app = DecoderServiceASGIApplication(Recorded())
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_listening(command: list[str], folder: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=folder)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"nothing listening on port {port}: {command}")


def connect_python_server(folder: Path) -> tuple[subprocess.Popen, int] | None:
    """connect-python's ASGI app for DecoderService under uvicorn, or None if not installed."""
    plugin = shutil.which("protoc-gen-connect-python")
    if plugin is None:
        print("connect-python comparison left out: protoc-gen-connect-python is not on PATH")
        return None
    sys.path.insert(0, str(REPO / "scripts"))
    import gen_protos
    from grpc_tools import protoc

    gen = folder / "gen"
    gen.mkdir()
    assert protoc.main(["protoc", *[f"-I{d}" for d in gen_protos._include_dirs()],
                        f"--plugin=protoc-gen-connect-python={plugin}",
                        f"--connect-python_out={gen}", "sam2/v1/decoder.proto"]) == 0
    package = gen / "sam2c"  # not "sam2": that is Meta's package
    package.mkdir()
    (package / "__init__.py").write_text("")
    code = (gen / "sam2" / "v1" / "decoder_connect.py").read_text()
    (package / "decoder_connect.py").write_text(
        code.replace("import sam2.v1.", "import sam2_shared.api.v1."))
    (folder / "cp_app.py").write_text(CONNECT_PYTHON_APP.format(
        gen=str(gen), repo=str(REPO), answer=str(folder / "answer.pb")))
    port = free_port()
    return start_listening([sys.executable, "-m", "uvicorn", "cp_app:app", "--port", str(port),
                            "--log-level", "warning"], folder, port), port


def bench_layers(request: decoder_pb2.SegmentRequest, answer: decoder_pb2.SegmentResponse,
                 rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "answer.pb").write_bytes(answer.SerializeToString())
        port = free_port()
        (folder / "ours_app.py").write_text(OURS_APP.format(
            repo=str(REPO), answer=str(folder / "answer.pb"), port=port))
        servers = [start_listening([sys.executable, "ours_app.py"], folder, port)]
        callers = {f"ours, {k}": v for k, v in http_callers(
            f"http://127.0.0.1:{port}", request).items() if not k.startswith("gRPC-Web")}
        theirs = connect_python_server(folder)
        if theirs is not None:
            servers.append(theirs[0])
            callers.update({f"connect-python, {k}": v for k, v in http_callers(
                f"http://127.0.0.1:{theirs[1]}", request).items()
                if not k.startswith("gRPC-Web")})
        try:
            times = interleaved(callers, rounds)
        finally:
            for process in servers:
                process.terminate()
                process.wait(10)
    report(f"HTTP layer alone, each in its own process, answering the click's recorded answer "
           f"({answer.ByteSize()} bytes); {rounds} rounds, loopback", times,
           "ours, Connect, binary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--requests", type=int, default=200, help="rounds per protocol")
    parser.add_argument("--layers", action="store_true",
                        help="also compare the HTTP layers alone (ours, connect-python)")
    args = parser.parse_args()
    use_scratch_tempdir("sam2-bench-", remove_at_exit=True)
    checkpoint = args.checkpoint or make_random_checkpoint(MODEL_ID)
    request, answer = bench_tiers(checkpoint, args.requests)
    if args.layers:
        bench_layers(request, answer, args.requests)


if __name__ == "__main__":
    main()
