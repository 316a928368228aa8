"""Self-tests of the parity harness: checkpoint format, torchvision stand-in, reference runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.checkpoints import DEFAULT_SEED, RECIPE_VERSION, checkpoint_path, random_tensor
from tests.helpers.reference import (
    MODEL_IDS,
    Normalize,
    ReferenceImage,
    Resize,
    ToTensor,
    build_reference_model,
    config_for,
    install_torchvision_stand_in,
)
from tests.helpers.synthetic_images import SHAPE_CENTRES, pixel_point


def test_model_ids_map_to_packaged_configs():
    from importlib.resources import files

    assert len(MODEL_IDS) == 8
    for model_id in MODEL_IDS:
        assert files("sam2").joinpath(config_for(model_id)).is_file(), model_id
    assert config_for("sam2.1/hiera_b_plus") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    with pytest.raises(ValueError):
        config_for("sam3/hiera_tiny")


def test_random_checkpoint_has_the_official_format(tiny_checkpoint: Path):
    payload = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert list(payload) == ["model"]
    state = payload["model"]
    expected = build_reference_model("sam2.1/hiera_tiny", checkpoint=None).state_dict()
    assert list(state) == list(expected)  # same keys in the same order
    assert len(state) == 471  # sam2.1 tiny, as measured in the reference notes
    for key, tensor in state.items():
        assert tensor.shape == expected[key].shape and tensor.dtype == expected[key].dtype, key
        assert tensor.abs().max() > 0, f"{key} is all zeros"
        if tensor.numel() > 1:
            assert tensor.float().std() > 0, f"{key} is constant"
    # Tensors Meta initialises to zero must now carry signal.
    for key in ("image_encoder.trunk.pos_embed", "no_mem_embed", "sam_mask_decoder.conv_s0.bias"):
        assert state[key].abs().mean() > 1e-3, key


def test_random_checkpoint_loads_strictly_into_the_reference(tiny_checkpoint: Path):
    model = build_reference_model("sam2.1/hiera_tiny", tiny_checkpoint)  # strict load inside
    stored = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["model"]
    assert torch.equal(model.no_mem_embed, stored["no_mem_embed"])
    assert not model.training


def test_random_tensors_are_seeded_per_key():
    like = torch.empty(64, 32)
    a = random_tensor("sam_mask_decoder.iou_prediction_head.layers.0.weight", like, seed=7)
    b = random_tensor("sam_mask_decoder.iou_prediction_head.layers.0.weight", like, seed=7)
    c = random_tensor("sam_mask_decoder.iou_prediction_head.layers.0.weight", like, seed=8)
    d = random_tensor("sam_mask_decoder.iou_prediction_head.layers.1.weight", like, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert 0.8 / 32**0.5 < float(a.std()) < 1.2 / 32**0.5  # N(0, 1/fan_in)
    norm = random_tensor("image_encoder.trunk.blocks.0.norm1.weight", torch.empty(96), seed=7)
    assert abs(float(norm.mean()) - 1.0) < 0.05


def test_checkpoint_cache_name_encodes_id_seed_and_recipe():
    path = checkpoint_path("sam2.1/hiera_b_plus", DEFAULT_SEED)
    assert path.name == f"sam2-1_hiera_b_plus_seed{DEFAULT_SEED}_r{RECIPE_VERSION}.pt"
    assert checkpoint_path("sam2/hiera_b_plus") != path


def test_torchvision_stand_in_matches_the_documented_transforms():
    install_torchvision_stand_in()
    import torchvision.transforms as transforms

    assert transforms.Resize is Resize and transforms.Normalize is Normalize
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    tensor = ToTensor()(rgb)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 37, 53)
    assert torch.equal(tensor, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    scripted = torch.jit.script(torch.nn.Sequential(Resize((64, 96)), Normalize(mean, std)))
    out = scripted(tensor)
    resized = F.interpolate(
        tensor[None], size=(64, 96), mode="bilinear", align_corners=False, antialias=True
    )[0]
    expected = (resized - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert out.shape == (3, 64, 96)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Downscaling really is antialiased (differs from plain bilinear).
    plain = F.interpolate(tensor[None], size=(9, 13), mode="bilinear", align_corners=False)[0]
    assert not torch.allclose(Resize((9, 13))(tensor), plain)


def test_reference_runner_shapes_and_cache(tiny_checkpoint: Path, synthetic_image):
    reference = ReferenceImage("sam2.1/hiera_tiny", tiny_checkpoint)
    rgb = synthetic_image(120, 160, seed=11)
    point = np.array([pixel_point(SHAPE_CENTRES["ellipse"], 120, 160)])
    out = reference.run(rgb, point_coords=point, point_labels=np.array([1]))
    assert out["image_embed"].shape == (1, 256, 64, 64)
    assert [f.shape for f in out["high_res_feats"]] == [(1, 32, 256, 256), (1, 64, 128, 128)]
    assert out["masks"].shape == out["logits"].shape == (1, 3, 120, 160)
    assert out["masks"].dtype == np.bool_
    assert out["scores"].shape == (1, 3)
    assert out["low_res_logits"].shape == (1, 3, 256, 256)
    assert np.abs(out["low_res_logits"]).max() <= 32
    np.testing.assert_array_equal(out["masks"], out["logits"] > 0)

    boxes = np.array([[10, 10, 60, 70], [80, 20, 150, 100]], dtype=np.float32)
    batched = reference.run(rgb, box=boxes, multimask_output=False)
    assert batched["masks"].shape == (2, 1, 120, 160)
    assert reference.encode_count == 1  # the second call reused the cached features
    reference.run(synthetic_image(50, 40, seed=12), point_coords=point / 3, point_labels=[1])
    again = reference.run(rgb, point_coords=point, point_labels=np.array([1]))
    assert reference.encode_count == 2
    np.testing.assert_array_equal(again["low_res_logits"], out["low_res_logits"])
