"""Checkpoint loader: errors that name the problem, split loading, file resolution, registry.

Files are the seeded random checkpoints in Meta's official format from tests/conftest.py.
Error cases that need no real weights load into modules on the ``meta`` device, so they cost
no memory or time; the cases that go through ``Sam2Model.from_pretrained`` use real files.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sam2_shared import Sam2Model
from sam2_shared.errors import CheckpointError, InvalidInputError, UnknownModelError
from sam2_shared.inference.checkpoints import (
    expected_checkpoint_keys,
    load_part,
    read_state_dict,
    resolve_checkpoint,
)
from sam2_shared.model import MODEL_CONFIGS, Sam2DecoderPart, Sam2EncoderPart, get_config
from tests.helpers.synthetic_images import synthetic_rgb

TINY = "sam2.1/hiera_tiny"
# Prompt encoder + mask decoder, without conv_s0/conv_s1 (those run at encode time).
DECODER_TENSOR_COUNT = 4_196_913

# Meta's published files (sam2/build_sam.py and checkpoints/download_ckpts.sh of sam2 1.1.0).
OFFICIAL_URLS = {
    "sam2/hiera_tiny": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_tiny.pt",
    "sam2/hiera_small": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_small.pt",
    "sam2/hiera_b_plus": (
        "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_base_plus.pt"
    ),
    "sam2/hiera_large": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_large.pt",
    "sam2.1/hiera_tiny": (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt"
    ),
    "sam2.1/hiera_small": (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt"
    ),
    "sam2.1/hiera_b_plus": (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt"
    ),
    "sam2.1/hiera_large": (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    ),
}


@pytest.fixture(scope="module")
def tiny_state(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tiny file's state dict (memory-mapped); tests copy it before changing it."""
    return read_state_dict(tiny_checkpoint)


def _meta_part(model_id: str, part: str) -> torch.nn.Module:
    with torch.device("meta"):
        config = get_config(model_id)
        return Sam2EncoderPart(config) if part == "encoder" else Sam2DecoderPart(config)


def _load_error(model_id: str, part: str, state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_part(_meta_part(model_id, part), part, state, "file.pt")
    return str(caught.value)


# ----- unreadable files ---------------------------------------------------------------------


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "sam2.1_hiera_tiny.pt"
    with pytest.raises(CheckpointError, match="does not exist") as caught:
        Sam2Model.from_pretrained(TINY, checkpoint=missing)
    assert str(missing) in str(caught.value)
    assert caught.value.reason == "CHECKPOINT_INVALID"


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable SAM 2 checkpoint") as caught:
        Sam2Model.from_pretrained(TINY, checkpoint=path, parts="decoder")
    assert str(path) in str(caught.value)


def test_truncated_checkpoint_is_rejected(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "truncated.pt"
    with open(tiny_checkpoint, "rb") as source, open(path, "wb") as target:
        target.write(source.read(tiny_checkpoint.stat().st_size // 2))
    with pytest.raises(CheckpointError, match="truncated") as caught:
        Sam2Model.from_pretrained(TINY, checkpoint=path, parts="decoder")
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        ({"state_dict": {"w": torch.zeros(2)}}, "expected a dict with a 'model'"),
        (torch.zeros(3), "expected a dict with a 'model'"),
        ({"model": torch.zeros(3)}, "'model' is not a state dict"),
    ],
    ids=["no-model-key", "bare-tensor", "model-not-a-dict"],
)
def test_torch_file_without_model_state_dict(tmp_path: Path, blob: object, fragment: str) -> None:
    path = tmp_path / "other.pt"
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=fragment):
        read_state_dict(path)


# ----- key and shape checks -----------------------------------------------------------------


def test_missing_keys_are_listed(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    removed = [
        "image_encoder.trunk.pos_embed",
        "image_encoder.trunk.blocks.3.attn.qkv.weight",
        "image_encoder.neck.convs.0.conv.bias",
    ]
    state = {k: v for k, v in tiny_state.items() if k not in removed}
    path = tmp_path / "missing.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="missing keys") as caught:
        Sam2Model.from_pretrained(TINY, checkpoint=path, parts="encoder")
    message = str(caught.value)
    for key in removed:
        assert key in message
    assert str(path) in message


def test_missing_decoder_keys_are_listed(tiny_state: dict[str, torch.Tensor]) -> None:
    removed = ["sam_mask_decoder.iou_token.weight", "sam_prompt_encoder.no_mask_embed.weight"]
    state = {k: v for k, v in tiny_state.items() if k not in removed}
    message = _load_error(TINY, "decoder", state)
    assert all(key in message for key in removed)


def test_wrong_shape_is_named(tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    message = _load_error(TINY, "decoder", state)
    assert "sam_mask_decoder.iou_token.weight" in message
    assert "(2, 256)" in message and "(1, 256)" in message


def test_extra_unknown_key_is_named(tiny_state: dict[str, torch.Tensor]) -> None:
    state = {**tiny_state, "image_encoder.trunk.extra_adapter.weight": torch.zeros(4)}
    for part in ("encoder", "decoder"):
        message = _load_error(TINY, part, state)
        assert "unexpected keys" in message
        assert "image_encoder.trunk.extra_adapter.weight" in message


def _size_mismatch(state: dict[str, torch.Tensor], model_id: str) -> tuple[list[str], list[str]]:
    """(missing, wrong-shape) encoder keys of ``model_id`` in ``state``."""
    expected = expected_checkpoint_keys(get_config(model_id), "encoder")
    missing = [k for k in expected if k not in state]
    wrong = [k for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    return missing, wrong


@pytest.mark.parametrize("parts", ["all", "encoder", "decoder"])
def test_tiny_file_for_the_small_id_is_refused(
    tiny_checkpoint: Path, tiny_state: dict[str, torch.Tensor], parts: str
) -> None:
    # The decoder half has the same shapes in every size, so only the file as a whole can tell
    # that it is not a hiera_small checkpoint: a decoder tier must refuse it too. The message
    # must point at the size mismatch (missing blocks 12-15, other dims in blocks 10-11).
    missing, wrong = _size_mismatch(tiny_state, "sam2.1/hiera_small")
    assert missing and wrong  # the premise: tiny lacks blocks 12-15 and has other dims
    with pytest.raises(CheckpointError) as caught:
        Sam2Model.from_pretrained("sam2.1/hiera_small", checkpoint=tiny_checkpoint, parts=parts)
    message = str(caught.value)
    assert "sam2.1/hiera_small" in message
    assert any(key in message for key in missing + wrong), message


@pytest.mark.parametrize("model_id", ["sam2.1/hiera_b_plus", "sam2.1/hiera_large"])
def test_tiny_file_for_bigger_ids_names_missing_or_wrong_shape_keys(
    tiny_state: dict[str, torch.Tensor], model_id: str
) -> None:
    missing, wrong = _size_mismatch(tiny_state, model_id)
    message = _load_error(model_id, "encoder", tiny_state)
    assert model_id in message
    assert any(key in message for key in missing[:8] + wrong[:4]), message


@pytest.mark.parametrize("parts", ["encoder", "decoder"])
def test_sam21_file_as_sam2_id_hints_at_sam21(tiny_checkpoint: Path, parts: str) -> None:
    with pytest.raises(CheckpointError) as caught:
        Sam2Model.from_pretrained("sam2/hiera_tiny", checkpoint=tiny_checkpoint, parts=parts)
    message = str(caught.value)
    assert "looks like a SAM 2.1 checkpoint" in message
    assert "obj_ptr_tpos_proj" in message or "no_obj_embed_spatial" in message


@pytest.mark.parametrize("parts", ["encoder", "decoder"])
def test_sam2_file_as_sam21_id_hints_at_sam2(
    random_checkpoint: Callable[..., Path], parts: str
) -> None:
    sam2_file = random_checkpoint("sam2/hiera_tiny")
    with pytest.raises(CheckpointError) as caught:
        Sam2Model.from_pretrained(TINY, checkpoint=sam2_file, parts=parts)
    message = str(caught.value)
    assert "looks like a SAM 2 checkpoint" in message
    assert "obj_ptr_tpos_proj" in message or "no_obj_embed_spatial" in message
    # ... and the same file loads under its own id.
    model = Sam2Model.from_pretrained("sam2/hiera_tiny", checkpoint=sam2_file, parts=parts)
    assert model.model_id == "sam2/hiera_tiny"


# ----- split loading ------------------------------------------------------------------------


def _module_attributes(model: Sam2Model) -> Iterator[torch.nn.Module]:
    return (value for value in vars(model).values() if isinstance(value, torch.nn.Module))


def test_decoder_part_holds_no_hiera_weights(
    tiny_checkpoint: Path, tiny_state: dict[str, torch.Tensor]
) -> None:
    model = Sam2Model.from_pretrained(TINY, checkpoint=tiny_checkpoint, parts="decoder")
    assert model.encoder is None
    modules = list(_module_attributes(model))
    assert modules == [model.decoder]
    names = [name for name, _ in model.decoder.named_parameters()]
    names += [name for name, _ in model.decoder.named_buffers()]
    assert not [name for name in names if "image_encoder" in name or "trunk" in name]
    tensors = list(model.decoder.parameters()) + list(model.decoder.buffers())
    total = sum(t.numel() for t in tensors)
    in_file = sum(
        v.numel()
        for k, v in tiny_state.items()
        if k.startswith(("sam_prompt_encoder.", "sam_mask_decoder."))
        and not k.startswith(("sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1."))
    )
    assert total == in_file == DECODER_TENSOR_COUNT
    # The weights are the file's, not a fresh initialisation.
    iou_token = model.decoder.sam_mask_decoder.iou_token.weight
    assert torch.equal(iou_token, tiny_state["sam_mask_decoder.iou_token.weight"])
    with pytest.raises(RuntimeError, match="without the encoder"):
        model.embed_images(np.zeros((8, 8, 3), np.uint8))


def test_encoder_part_holds_no_decoder(tiny_checkpoint: Path) -> None:
    model = Sam2Model.from_pretrained(TINY, checkpoint=tiny_checkpoint, parts="encoder")
    assert model.decoder is None
    assert list(_module_attributes(model)) == [model.encoder]
    names = list(model.encoder.state_dict())
    assert not [n for n in names if n.startswith(("sam_prompt_encoder", "sam_mask_decoder"))]
    assert "conv_s0.weight" in names and "no_mem_embed" in names


def test_unknown_parts_value_is_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="parts"):
        Sam2Model.from_pretrained(TINY, checkpoint=tiny_checkpoint, parts="trunk")


def test_halves_together_give_the_masks_of_the_whole_model(tiny_checkpoint: Path) -> None:
    whole = Sam2Model.from_pretrained(TINY, checkpoint=tiny_checkpoint, parts="all")
    encoder = Sam2Model.from_pretrained(TINY, checkpoint=tiny_checkpoint, parts="encoder")
    decoder = Sam2Model.from_pretrained(TINY, checkpoint=tiny_checkpoint, parts="decoder")
    image = synthetic_rgb(90, 120)
    from_whole = whole.embed_images(image, input_color_format="rgb")[0]
    from_half = encoder.embed_images(image, input_color_format="rgb")[0]
    assert from_half.embedding_id == from_whole.embedding_id
    assert torch.equal(from_half.image_embed, from_whole.image_embed)
    for ours, theirs in zip(from_half.high_res_feats, from_whole.high_res_feats, strict=True):
        assert torch.equal(ours, theirs)
    with pytest.raises(RuntimeError, match="without the decoder"):
        encoder.segment_images(embeddings=from_half, boxes=[10, 10, 60, 50])

    prompts = {
        "point_coordinates": [[[30, 50]], [[90, 20]]],
        "point_labels": [[1], [1]],
        "boxes": [[10, 10, 60, 80], [70, 5, 110, 40]],
    }
    expected = whole.segment_images(embeddings=from_whole, **prompts)[0]
    got = decoder.segment_images(embeddings=from_half, **prompts)[0]
    assert got.masks.shape == (2, 3, 90, 120)
    assert np.array_equal(got.masks, expected.masks)
    assert np.array_equal(got.logits, expected.logits)
    assert np.array_equal(got.scores, expected.scores)


# ----- resolving a model id to a file -------------------------------------------------------


def test_explicit_path_wins(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = get_config(TINY)
    (tmp_path / config.checkpoint_filename).write_bytes(b"not used")
    found = resolve_checkpoint(config, tiny_checkpoint, cache_dir=tmp_path, download=False)
    assert found == tiny_checkpoint


def test_found_in_cache_dir_by_official_name(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = get_config(TINY)
    assert config.checkpoint_filename == "sam2.1_hiera_tiny.pt"
    (tmp_path / config.checkpoint_filename).symlink_to(tiny_checkpoint)
    assert resolve_checkpoint(config, cache_dir=tmp_path, download=False) == (
        tmp_path / "sam2.1_hiera_tiny.pt"
    )
    model = Sam2Model.from_pretrained(TINY, cache_dir=tmp_path, download=False, parts="decoder")
    assert model.decoder is not None


def test_default_cache_dir_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sam2_shared.inference.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "DEFAULT_CACHE_DIR", tmp_path)
    config = get_config("sam2/hiera_small")
    (tmp_path / config.checkpoint_filename).write_bytes(b"x")
    assert resolve_checkpoint(config, download=False) == tmp_path / "sam2_hiera_small.pt"


def _assert_tells_where_to_put_it(message: str, model_id: str, directory: Path) -> None:
    config = get_config(model_id)
    assert config.checkpoint_url in message
    assert str(directory / config.checkpoint_filename) in message


def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("no download was asked for")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_absent_without_download_tells_where_to_put_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_network(monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        Sam2Model.from_pretrained(TINY, cache_dir=tmp_path, download=False)
    _assert_tells_where_to_put_it(str(caught.value), TINY, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "failure",
    [OSError("network is unreachable"), urllib.error.URLError("Name or service not known")],
    ids=["oserror", "urlerror"],
)
def test_unreachable_url_gives_the_same_helpful_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: OSError
) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(get_config(TINY), cache_dir=tmp_path, download=True)
    message = str(caught.value)
    _assert_tells_where_to_put_it(message, TINY, tmp_path)
    assert "could not download" in message
    assert not (tmp_path / "sam2.1_hiera_tiny.pt").exists()


class _FakeResponse:
    """What ``urlopen`` returns: a readable body with headers, usable as a context manager."""

    def __init__(
        self, body: bytes, content_length: int | None = None, on_read: Callable[[], None] = None
    ) -> None:
        self._body = io.BytesIO(body)
        length = len(body) if content_length is None else content_length
        self.headers = {"Content-Length": str(length)}
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        if self._on_read is not None:
            self._on_read()
        return self._body.read(size)

    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _small_torch_zip() -> tuple[bytes, torch.Tensor]:
    weights = torch.arange(4096, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save({"model": {"w": weights}}, buffer)
    return buffer.getvalue(), weights


def _serve(
    monkeypatch: pytest.MonkeyPatch, body: bytes, **kwargs: object
) -> list[str]:
    """Serve ``body`` for any URL; returns the list of requested URLs."""
    requested: list[str] = []

    def urlopen(url: str, *args: object, **more: object) -> _FakeResponse:
        requested.append(url)
        return _FakeResponse(body, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


def test_download_writes_the_file_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = get_config(TINY)
    cache_dir = tmp_path / "cache"  # created by the download
    target = cache_dir / config.checkpoint_filename
    body, weights = _small_torch_zip()
    seen_during_download: list[list[str]] = []

    def while_reading() -> None:
        # The final name never holds a partial file: data goes to a sibling, then a rename.
        assert not target.exists()
        seen_during_download.append(sorted(p.name for p in cache_dir.iterdir()))

    requested = _serve(monkeypatch, body, on_read=while_reading)
    found = resolve_checkpoint(config, cache_dir=cache_dir, download=True)
    assert found == target
    assert requested == [config.checkpoint_url]
    assert target.read_bytes() == body
    assert torch.equal(read_state_dict(target)["w"], weights)
    pin = cache_dir / (config.checkpoint_filename + ".sha256")
    assert sorted(os.listdir(cache_dir)) == [config.checkpoint_filename, pin.name]
    assert pin.read_text().strip() == hashlib.sha256(body).hexdigest()
    partials = {name for names in seen_during_download for name in names}
    assert len(partials) == 1 and config.checkpoint_filename not in partials
    assert all(name.endswith(".part") for name in partials)


def test_processes_sharing_a_cache_dir_download_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An encoder and a decoder starting together on one volume: one downloads, the other
    # waits for the directory lock and then uses the finished, verified file.
    config = get_config(TINY)
    body, weights = _small_torch_zip()
    started = threading.Event()

    def slow_read() -> None:
        started.set()
        time.sleep(0.05)

    requested = _serve(monkeypatch, body, on_read=slow_read)
    found: list[Path] = []
    errors: list[BaseException] = []

    def resolve() -> None:
        try:
            found.append(resolve_checkpoint(config, cache_dir=tmp_path, download=True))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    first = threading.Thread(target=resolve)
    first.start()
    assert started.wait(10)  # the first is mid-download when the second arrives
    second = threading.Thread(target=resolve)
    second.start()
    first.join(30)
    second.join(30)
    assert errors == []
    assert requested == [config.checkpoint_url]
    assert found == [tmp_path / config.checkpoint_filename] * 2
    assert torch.equal(read_state_dict(found[0])["w"], weights)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_a_cached_download_that_changed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = get_config(TINY)
    body, weights = _small_torch_zip()
    _serve(monkeypatch, body)
    path = resolve_checkpoint(config, cache_dir=tmp_path, download=True)
    _forbid_network(monkeypatch)
    assert resolve_checkpoint(config, cache_dir=tmp_path, download=True) == path  # unchanged
    path.write_bytes(_flip_a_data_byte(body, weights))  # e.g. rewritten on a shared volume
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(config, cache_dir=tmp_path, download=True)
    message = str(caught.value)
    assert "changed since it was downloaded" in message and "delete both" in message
    assert hashlib.sha256(body).hexdigest() in message


def test_a_file_put_in_the_cache_by_hand_needs_no_pin(tiny_checkpoint: Path, tmp_path: Path
                                                      ) -> None:
    config = get_config(TINY)
    shutil.copyfile(tiny_checkpoint, tmp_path / config.checkpoint_filename)
    found = resolve_checkpoint(config, cache_dir=tmp_path, download=False)
    assert found == tmp_path / config.checkpoint_filename


def _flip_a_data_byte(body: bytes, weights: torch.Tensor) -> bytes:
    marker = weights.numpy().tobytes()[4000:4016]
    at = body.find(marker)
    assert at > 0
    corrupt = bytearray(body)
    corrupt[at + 3] ^= 0xFF
    return bytes(corrupt)


def _reset_after_first_chunk() -> Callable[[], None]:
    reads = 0

    def on_read() -> None:
        nonlocal reads
        reads += 1
        if reads > 1:
            raise ConnectionResetError("connection reset by peer")

    return on_read


@pytest.mark.parametrize(
    "damage", ["bad-crc", "not-a-zip", "short-transfer", "connection-reset"]
)
def test_corrupt_download_is_rejected_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    config = get_config(TINY)
    body, weights = _small_torch_zip()
    if damage == "bad-crc":
        _serve(monkeypatch, _flip_a_data_byte(body, weights))
    elif damage == "not-a-zip":
        _serve(monkeypatch, np.random.default_rng(1).bytes(5000))
    elif damage == "short-transfer":
        _serve(monkeypatch, body[: len(body) // 2], content_length=len(body))
    else:  # the connection drops after part of the file arrived
        _serve(monkeypatch, body, on_read=_reset_after_first_chunk())
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(config, cache_dir=tmp_path, download=True)
    _assert_tells_where_to_put_it(str(caught.value), TINY, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_replaces_no_existing_directory_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another model's file in the same cache dir is left alone by a failed download.
    neighbour = tmp_path / get_config("sam2/hiera_tiny").checkpoint_filename
    shutil.copyfile(__file__, neighbour)
    _serve(monkeypatch, b"garbage")
    with pytest.raises(CheckpointError):
        resolve_checkpoint(get_config(TINY), cache_dir=tmp_path, download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [neighbour.name]


# ----- the registry of model ids ------------------------------------------------------------


def test_unknown_model_id_lists_the_known_ones(tiny_checkpoint: Path) -> None:
    with pytest.raises(UnknownModelError) as caught:
        Sam2Model.from_pretrained("sam3/hiera_huge", checkpoint=tiny_checkpoint)
    error = caught.value
    assert isinstance(error, InvalidInputError) and isinstance(error, ValueError)
    assert error.reason == "UNKNOWN_MODEL"
    assert "sam3/hiera_huge" in str(error)
    for model_id in OFFICIAL_URLS:
        assert model_id in str(error)


def test_registry_has_exactly_the_eight_official_ids() -> None:
    assert sorted(MODEL_CONFIGS) == sorted(OFFICIAL_URLS)


@pytest.mark.parametrize("model_id", sorted(OFFICIAL_URLS))
def test_each_official_id_resolves_to_its_published_url(model_id: str) -> None:
    config = get_config(model_id)
    assert config.model_id == model_id
    assert config.family == model_id.split("/")[0]
    assert config.checkpoint_url == OFFICIAL_URLS[model_id]
    assert config.checkpoint_filename == OFFICIAL_URLS[model_id].rsplit("/", 1)[1]
