"""Proto hygiene with buf (``buf.yaml``, run by ``scripts/buf_check.py`` with the npm buf of
``package.json``): lint passes and catches a violation; the API has no wire- or JSON-breaking
change against the released one, and a breaking change is caught; every file carries the
options other languages' generators need."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import buf_check  # noqa: E402

PROTOS = REPO_ROOT / "protos"


@pytest.fixture(scope="module", autouse=True)
def buf_installed() -> None:
    assert buf_check.BUF.exists(), "buf is not installed: run npm ci (scripts/setup_env.sh)"


def copy_of_protos(tmp_path: Path) -> Path:
    root = tmp_path / "protos"
    shutil.copytree(PROTOS / "sam2", root / "sam2")
    return root


def test_lint_passes() -> None:
    result = buf_check.lint()
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_finds_a_violation(tmp_path: Path) -> None:
    root = copy_of_protos(tmp_path)
    common = root / "sam2" / "v1" / "common.proto"
    common.write_text(common.read_text().replace("POINT_LABEL_UNSPECIFIED", "POINT_LABEL_NONE"))
    result = buf_check.lint(root)
    assert result.returncode != 0
    assert 'Enum zero value name "POINT_LABEL_NONE" should be suffixed with "_UNSPECIFIED"' \
        in result.stdout


def test_no_breaking_change_against_the_release() -> None:
    result = buf_check.breaking()
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("old", "new", "finding"), [
    ("string embedding_id = 1", "string embedding_id = 9",
     'Previously present field "1" with name "embedding_id"'),
    ("  rpc SegmentStream(", "  rpc SegmentStreams(", 'Previously present RPC "SegmentStream"'),
])
def test_a_breaking_change_is_found(tmp_path: Path, old: str, new: str, finding: str) -> None:
    root = copy_of_protos(tmp_path)
    decoder = root / "sam2" / "v1" / "decoder.proto"
    assert old in decoder.read_text()
    decoder.write_text(decoder.read_text().replace(old, new, 1))
    result = buf_check.breaking(root)
    assert result.returncode != 0
    assert finding in result.stdout, result.stdout


def test_the_released_image_is_the_commit_it_names(tmp_path: Path) -> None:
    commit = buf_check.RELEASED_SOURCE.read_text().strip()
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO_ROOT,
                           capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"this clone lacks the history of the released commit {commit}")
    rebuilt = buf_check.snapshot(commit, tmp_path / "released.binpb")
    assert rebuilt.read_bytes() == buf_check.RELEASED_IMAGE.read_bytes()


def test_every_file_has_the_options_of_other_languages(tmp_path: Path) -> None:
    image = buf_check.build_image(PROTOS, tmp_path / "api.binpb", source_info=False)
    files = [f for f in descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file
             if f.package == "sam2.v1"]
    assert len(files) == 4
    for file in files:
        options = file.options
        stem = Path(file.name).stem
        assert options.go_package.endswith("/gen/go/sam2/v1;sam2v1"), file.name
        assert options.java_package.endswith(".sam2.v1") and options.java_multiple_files
        assert options.java_outer_classname == f"{stem.capitalize()}Proto"
        assert (options.csharp_namespace, options.php_namespace, options.ruby_package,
                options.objc_class_prefix) == ("Sam2.V1", "Sam2\\V1", "Sam2::V1", "SAM")
    assert len({f.options.java_package for f in files}) == 1
