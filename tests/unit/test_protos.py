"""The committed generated code matches the protos, imports beside Meta's ``sam2``,
and the protos follow the AIP conventions we rely on."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import gen_protos  # noqa: E402

COMMITTED = REPO_ROOT / "sam2_shared" / "api"


def test_regeneration_changes_nothing(tmp_path: Path) -> None:
    gen_protos.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(COMMITTED)
        for p in COMMITTED.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == committed
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, COMMITTED, [str(p) for p in fresh], False)
    assert mismatch == [] and errors == [], "run: python scripts/gen_protos.py"


def test_generated_code_imports_beside_meta_sam2() -> None:
    # Import Meta's sam2 first, then our API: a top-level sam2.v1 would fail here.
    code = (
        "import sam2, sam2_shared.api.v1.decoder_pb2_grpc as d, "
        "sam2_shared.api.v1.encoder_pb2_grpc as e\n"
        "assert 'site-packages' in sam2.__file__, sam2.__file__\n"
        "print(d.sam2_dot_v1_dot_decoder__pb2.SegmentRequest.DESCRIPTOR.full_name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory() as cwd:  # never run from a dir holding sam2/
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sam2.v1.SegmentRequest"


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("descriptors") / "api.pb"
    protos = sorted(
        p.relative_to(gen_protos.PROTO_ROOT)
        for p in (gen_protos.PROTO_ROOT / "sam2" / "v1").glob("*.proto")
    )
    args = [
        "protoc",
        *[f"-I{d}" for d in gen_protos._include_dirs()],
        f"--descriptor_set_out={out}",
        "--include_source_info",
        *map(str, protos),
    ]
    assert protoc.main(args) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert [f.name for f in files.file] == [
        f"sam2/v1/{n}.proto" for n in ("common", "decoder", "encoder", "tracking")
    ]
    return files


def test_package_and_services(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    assert {f.package for f in descriptor_set.file} == {"sam2.v1"}
    services = {s.name: [m.name for m in s.method] for f in descriptor_set.file for s in f.service}
    assert services == {
        "DecoderService": ["Segment", "SegmentStream"],
        "EncoderService": ["EmbedImages", "GetEmbedding", "PutEmbedding"],
        "TrackingService": ["StartSession", "StartSessionFromFrames", "AddPrompt", "Propagate",
                            "RemoveObject", "ResetSession", "CloseSession"],
    }


def test_every_rpc_has_its_own_request_and_response(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    seen: set[str] = set()
    for f in descriptor_set.file:
        for service in f.service:
            for method in service.method:
                assert method.input_type == f".sam2.v1.{method.name}Request"
                assert method.output_type == f".sam2.v1.{method.name}Response"
                assert method.input_type not in seen and method.output_type not in seen
                seen |= {method.input_type, method.output_type}


def test_enums_start_with_unspecified(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    enums = [e for f in descriptor_set.file for e in f.enum_type]
    assert {e.name for e in enums} == {"ColorFormat", "PointLabel", "MaskFormat"}
    for enum in enums:
        prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_")
        assert enum.value[0].number == 0
        assert enum.value[0].name == f"{prefix}_UNSPECIFIED"
        assert all(v.name.startswith(prefix + "_") for v in enum.value)


def test_every_element_is_documented(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    undocumented = []
    for f in descriptor_set.file:
        documented = {
            tuple(loc.path) for loc in f.source_code_info.location if loc.leading_comments.strip()
        }
        # Paths per descriptor.proto: 4 message_type, 5 enum_type, 6 service; 2 = field,
        # enum value or method inside them.
        for i, message in enumerate(f.message_type):
            elements = [((4, i), message.name)]
            elements += [
                ((4, i, 2, j), f"{message.name}.{fl.name}") for j, fl in enumerate(message.field)
            ]
            undocumented += [name for path, name in elements if path not in documented]
        for i, enum in enumerate(f.enum_type):
            elements = [((5, i), enum.name)]
            elements += [((5, i, 2, j), v.name) for j, v in enumerate(enum.value)]
            undocumented += [name for path, name in elements if path not in documented]
        for i, service in enumerate(f.service):
            elements = [((6, i), service.name)]
            elements += [((6, i, 2, j), m.name) for j, m in enumerate(service.method)]
            undocumented += [name for path, name in elements if path not in documented]
    assert undocumented == []
