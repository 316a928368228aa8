"""Random checkpoints in the official SAM 2 format, for tests that cannot download weights.

``make_random_checkpoint`` instantiates Meta's model for an official model id (every key,
shape and dtype as in the released ``.pt`` files), overwrites every tensor of its
``state_dict()`` with seeded noise (one generator per key, so a tensor does not depend on
the order or presence of other keys) and saves ``{"model": state_dict}`` with
``torch.save``, exactly like the official files.

Meta's own initialisation leaves many tensors at zero (Hiera position embeddings,
``no_mem_embed``, biases) and would give near-constant masks, so the scales are chosen per
tensor kind to keep activations O(1) and masks informative (checked by the harness
self-test in tests/parity/test_reference_harness.py):

- Linear / conv weights: N(0, 1/fan_in) (transposed convs: fan_in = input channels);
- LayerNorm weights: 1 + N(0, 0.1^2); biases: N(0, 0.02^2);
- prompt and output tokens (nn.Embedding): N(0, 1), like nn.Embedding's own init;
- learned additive embeddings (Hiera ``pos_embed*``, ``no_mem_embed`` ...): N(0, 0.1^2);
- the random-Fourier Gaussian matrix: N(0, 1), like its own init;
- layer-scale ``gamma``: N(0.1, 0.02^2).

Files are cached in ``$SAM2_TEST_CACHE`` (default ``~/.cache/sam2-serving-tests``) by model
id, seed and ``RECIPE_VERSION``, written atomically so concurrent sessions can share them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile
from pathlib import Path

import torch

from sam2_shared.embedding import ImageEmbedding
from tests.helpers.reference import build_reference_model

# Bump whenever the noise recipe changes, so stale cached files are not reused.
RECIPE_VERSION = 1
DEFAULT_SEED = 1234

_EMBEDDING_TABLES = (
    "point_embeddings.",
    "not_a_point_embed.",
    "no_mask_embed.",
    "iou_token.",
    "mask_tokens.",
    "obj_score_token.",
)


def cache_dir() -> Path:
    root = os.environ.get("SAM2_TEST_CACHE") or Path.home() / ".cache" / "sam2-serving-tests"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _key_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little"))
    return generator


def _fan_in(key: str, shape: torch.Size) -> int:
    if "output_upscaling" in key and len(shape) == 4:
        # ConvTranspose2d weight (in, out, k, k) with stride == k: each output pixel sees
        # exactly one tap per input channel.
        return int(shape[0])
    return int(math.prod(shape[1:]))


def random_tensor(key: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded replacement for the state-dict entry ``key`` (same shape and dtype)."""
    noise = torch.randn(like.shape, generator=_key_generator(seed, key), dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("positional_encoding_gaussian_matrix"):
        value = noise
    elif any(table in key for table in _EMBEDDING_TABLES):
        value = noise
    elif leaf == "bias":
        value = 0.02 * noise
    elif leaf == "weight" and noise.dim() == 1:  # LayerNorm / LayerNorm2d
        value = 1.0 + 0.1 * noise
    elif leaf == "weight":
        value = noise / math.sqrt(_fan_in(key, noise.shape))
    elif leaf == "gamma":  # ConvNeXt layer scale in the memory encoder
        value = 0.1 + 0.02 * noise
    else:
        # Free parameters added to activations: pos_embed, pos_embed_window, no_mem_embed,
        # no_mem_pos_enc, no_obj_ptr, maskmem_tpos_enc, no_obj_embed_spatial.
        value = 0.1 * noise
    return value.to(like.dtype)


def random_state_dict(model_id: str, seed: int = DEFAULT_SEED) -> dict[str, torch.Tensor]:
    """Every tensor of Meta's ``model_id`` state dict, replaced by seeded noise."""
    model = build_reference_model(model_id, checkpoint=None)
    state = model.state_dict()
    del model
    return {key: random_tensor(key, value, seed) for key, value in state.items()}


def checkpoint_path(model_id: str, seed: int = DEFAULT_SEED) -> Path:
    name = model_id.replace("/", "_").replace(".", "-")
    return cache_dir() / f"{name}_seed{seed}_r{RECIPE_VERSION}.pt"


def make_random_checkpoint(model_id: str, seed: int = DEFAULT_SEED) -> Path:
    """Path of a cached random official-format checkpoint, creating it if missing."""
    path = checkpoint_path(model_id, seed)
    if path.exists():
        return path
    state = random_state_dict(model_id, seed)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"model": state}, tmp_name)
        os.replace(tmp_name, path)  # atomic: readers never see a partial file
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def object_mask_checkpoint(source: Path, target: Path) -> Path:
    """``source`` with each of the mask decoder's transposed upscaling convs given one kernel
    for all four output positions, saved as ``target``. Random kernels stamp a 2x2 pattern
    on every upscaling step, so the masks are speckled whatever the features; with these and
    smooth features (``smooth_features``; ``bench/bench_grpc.py --masks objects``) masks have
    smooth edges, like object masks. Same shapes and FLOPs as ``source``: for timing, not
    for parity."""
    blob = torch.load(source, map_location="cpu", weights_only=True)
    for index in (0, 3):  # output_upscaling's two ConvTranspose2d layers
        key = f"sam_mask_decoder.output_upscaling.{index}.weight"
        weight = blob["model"][key]
        blob["model"][key] = weight.mean(dim=(2, 3), keepdim=True).expand_as(weight).clone()
    torch.save(blob, target)
    return target


def smooth_features(embedding: ImageEmbedding, seed: int = 0) -> ImageEmbedding:
    """``embedding`` with every feature map replaced by three broad Gaussian bumps of random
    centre and sign per channel: with ``object_mask_checkpoint`` the random decoder then makes
    object-like masks (~7 k COCO RLE characters at 1080p, not ~100 k)."""
    generator = torch.Generator().manual_seed(seed)

    def bumps(like: torch.Tensor) -> torch.Tensor:
        channels, size = like.shape[1], like.shape[-1]
        axis = torch.linspace(0, 1, size)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        out = torch.zeros(channels, size, size)
        for _ in range(3):
            cx, cy, sign = (torch.rand(channels, 1, 1, generator=generator),
                            torch.rand(channels, 1, 1, generator=generator),
                            torch.randn(channels, 1, 1, generator=generator))
            out += sign * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.03)
        return (3 * out)[None].to(like.dtype)

    return dataclasses.replace(
        embedding, image_embed=bumps(embedding.image_embed),
        high_res_feats=(bumps(embedding.high_res_feats[0]), bumps(embedding.high_res_feats[1])))


def present_checkpoint(source: Path, target: Path, object_score_shift: float = 1.0) -> Path:
    """``source`` with the object-score head's output bias raised by ``object_score_shift``,
    saved as ``target``: random weights judge every object absent (video masks all empty);
    shifted, objects are present and masks depend on prompts and memories."""
    blob = torch.load(source, map_location="cpu", weights_only=True)
    blob["model"]["sam_mask_decoder.pred_obj_score_head.layers.2.bias"] += object_score_shift
    torch.save(blob, target)
    return target
