"""The benches' object-like masks from random weights (``bench_grpc.py --masks objects``):
``object_mask_checkpoint`` + ``smooth_features`` must give masks with few edges, or the
benches' "object-like" rows measure speckle under another name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.wire import masks as mask_codec
from tests.helpers.checkpoints import object_mask_checkpoint, smooth_features
from tests.helpers.synthetic_images import synthetic_rgb

MODEL_ID = "sam2.1/hiera_tiny"
HW = (540, 960)


def _rle_chars(checkpoint: Path, smooth: bool) -> float:
    model = Sam2Model.from_pretrained(MODEL_ID, checkpoint)
    [embedding] = model.embed_images(synthetic_rgb(*HW), input_color_format="rgb")
    if smooth:
        embedding = smooth_features(embedding)
    [prediction] = model.segment_images(
        embeddings=embedding, point_coordinates=np.array([[480.0, 270.0]], np.float32),
        point_labels=np.array([1]), use_mask_input_cache=False)
    masks = prediction.masks.numpy()
    assert masks.shape == (3, *HW)
    assert all(0.01 < mask.mean() < 0.99 for mask in masks)  # neither empty nor full
    return float(np.mean([len(counts) for counts in mask_codec.encode_coco_rle(masks)]))


def test_object_mode_masks_have_few_edges(tiny_checkpoint: Path, tmp_path: Path) -> None:
    speckled = _rle_chars(tiny_checkpoint, smooth=False)
    objects = _rle_chars(object_mask_checkpoint(tiny_checkpoint, tmp_path / "objects.pt"),
                         smooth=True)
    # Measured: ~39 k characters speckled, ~3 k object-like; either change alone 14-57 k.
    assert objects * 5 < speckled, (objects, speckled)
