"""Harness around Meta's reference SAM 2 image predictor (PyPI ``sam2==1.1.0``).

The reference is run as users get it: ``build_sam2(config, ckpt_path, device="cpu")`` with
the builder's default post-processing (dynamic multimask fallback on) and
``SAM2ImagePredictor`` for preprocessing, prompt handling and post-processing.

``sam2.utils.transforms`` imports torchvision for three transforms, and torchvision must
not be installed beside our torch. ``install_torchvision_stand_in`` registers a minimal
``torchvision.transforms`` with the same numerics (torchvision >= 0.17 on float tensors):
``ToTensor`` (HWC uint8 -> CHW float32 / 255), ``Resize`` (bilinear, align_corners=False,
antialias=True) and ``Normalize`` ((x - mean) / std). Resize and Normalize are
``nn.Module``s whose ``forward`` TorchScript can compile, because the reference wraps them
in ``torch.jit.script(nn.Sequential(...))``.
"""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Official model id -> Hydra config name inside the ``sam2`` package.
_SIZE_TO_CONFIG_SUFFIX = {
    "hiera_tiny": "t",
    "hiera_small": "s",
    "hiera_b_plus": "b+",
    "hiera_large": "l",
}
MODEL_IDS: tuple[str, ...] = tuple(
    f"{family}/{size}" for family in ("sam2", "sam2.1") for size in _SIZE_TO_CONFIG_SUFFIX
)


def config_for(model_id: str) -> str:
    """Hydra config name of an official model id, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``."""
    family, _, size = model_id.partition("/")
    if family not in ("sam2", "sam2.1") or size not in _SIZE_TO_CONFIG_SUFFIX:
        raise ValueError(f"unknown model id {model_id!r}; expected one of {MODEL_IDS}")
    return f"configs/{family}/{family}_hiera_{_SIZE_TO_CONFIG_SUFFIX[size]}.yaml"


# ---------------------------------------------------------------------------------------
# torchvision stand-in


class ToTensor:
    """HWC (or HW) numpy array -> CHW float tensor; uint8 is scaled to [0, 1]."""

    def __call__(self, pic: np.ndarray) -> torch.Tensor:
        if not isinstance(pic, np.ndarray):
            raise TypeError(f"the torchvision stand-in only takes numpy arrays, got {type(pic)}")
        array = pic[:, :, None] if pic.ndim == 2 else pic
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).contiguous()
        if tensor.dtype == torch.uint8:
            return tensor.to(dtype=torch.get_default_dtype()).div(255)
        return tensor


class Resize(nn.Module):
    """Bilinear resize of a float CHW / NCHW tensor with antialiasing (torchvision default)."""

    def __init__(self, size: list[int] | tuple[int, int]) -> None:
        super().__init__()
        if isinstance(size, int) or len(size) != 2:
            raise ValueError("the stand-in Resize only supports an explicit (height, width)")
        self.size = [int(size[0]), int(size[1])]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-2] == self.size[0] and img.shape[-1] == self.size[1]:
            return img  # torchvision returns the input unchanged at the target size
        squeeze = img.dim() == 3
        batch = img.unsqueeze(0) if squeeze else img
        out = F.interpolate(
            batch, size=self.size, mode="bilinear", align_corners=False, antialias=True
        )
        return out.squeeze(0) if squeeze else out


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on a CHW / NCHW tensor."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return (tensor - mean) / std


STAND_IN_MARKER = "__sam2_serving_stand_in__"


def install_torchvision_stand_in() -> None:
    """Register the stand-in as ``torchvision`` / ``torchvision.transforms`` (idempotent).

    A real torchvision already imported is left alone; it is not expected here.
    """
    if "torchvision" in sys.modules:
        return
    package = types.ModuleType("torchvision")
    package.__path__ = []  # a package, so ``import torchvision.transforms`` resolves
    setattr(package, STAND_IN_MARKER, True)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor = ToTensor  # type: ignore[attr-defined]
    transforms.Resize = Resize  # type: ignore[attr-defined]
    transforms.Normalize = Normalize  # type: ignore[attr-defined]
    package.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"] = package
    sys.modules["torchvision.transforms"] = transforms


def _check_import_location() -> None:
    # build_sam refuses (and a local folder would shadow the package) when the working
    # directory holds a ``sam2/`` folder.
    if (Path.cwd() / "sam2").is_dir():
        raise RuntimeError(
            f"run the reference from a directory without a sam2/ folder (cwd={Path.cwd()})"
        )


def build_reference_model(model_id: str, checkpoint: str | Path | None) -> nn.Module:
    """Meta's ``SAM2Base`` for ``model_id`` on CPU in eval mode, strictly loaded."""
    _check_import_location()
    from sam2.build_sam import build_sam2

    ckpt = None if checkpoint is None else str(checkpoint)
    return build_sam2(config_for(model_id), ckpt_path=ckpt, device="cpu")


# ---------------------------------------------------------------------------------------
# reference runner


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(np.float32, copy=False)


def image_key(rgb: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(rgb).tobytes())
    digest.update(repr((rgb.shape, str(rgb.dtype))).encode())
    return digest.hexdigest()


class ReferenceImage:
    """Meta's ``SAM2ImagePredictor`` on one model, with ``set_image`` cached per image.

    ``run`` returns numpy float32 arrays, always with a leading prompt axis P:
        image_embed [1,256,64,64]; high_res_feats ([1,32,256,256], [1,64,128,128]);
        logits [P,C,H,W] full-resolution logits; masks [P,C,H,W] bool (logits > 0);
        scores [P,C]; low_res_logits [P,C,256,256] (clamped to +-32 by the predictor).
    """

    def __init__(self, model_id: str, checkpoint: str | Path, max_cached_images: int = 16) -> None:
        install_torchvision_stand_in()
        _check_import_location()
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model_id = model_id
        self.model = build_reference_model(model_id, checkpoint)
        self.predictor = SAM2ImagePredictor(self.model)
        self._max_cached_images = max_cached_images
        self._features: dict[str, tuple[dict[str, Any], list[tuple[int, int]]]] = {}
        self.encode_count = 0  # how often the encoder actually ran (for cache tests)

    @torch.inference_mode()
    def set_image(self, rgb: np.ndarray) -> None:
        """Encode ``rgb`` (HxWx3 uint8) unless it was encoded before, and make it current."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"reference expects HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
        key = image_key(rgb)
        cached = self._features.get(key)
        if cached is None:
            self.predictor.set_image(rgb)
            self.encode_count += 1
            cached = (self.predictor._features, list(self.predictor._orig_hw))
            if len(self._features) >= self._max_cached_images:
                self._features.pop(next(iter(self._features)))
            self._features[key] = cached
        # Restore the predictor's own cached state for this image (what set_image sets).
        self.predictor.reset_predictor()
        self.predictor._features = cached[0]
        self.predictor._orig_hw = list(cached[1])
        self.predictor._is_image_set = True
        self.predictor._is_batch = False

    def features(self, rgb: np.ndarray) -> dict[str, Any]:
        """``image_embed`` and ``high_res_feats`` of ``rgb`` as numpy float32."""
        self.set_image(rgb)
        feats = self.predictor._features
        return {
            "image_embed": _as_numpy(feats["image_embed"]),
            "high_res_feats": tuple(_as_numpy(f) for f in feats["high_res_feats"]),
        }

    @torch.inference_mode()
    def run(
        self,
        rgb: np.ndarray,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> dict[str, Any]:
        """Encode (cached) and decode one prompt set, exactly as ``predictor.predict`` does."""
        out = self.features(rgb)
        logits, scores, low_res = self.predictor.predict(
            point_coords=point_coords,
            point_labels=point_labels,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask_output,
            return_logits=True,
        )
        # predict() squeezes a prompt batch of one; restore the P axis.
        if scores.ndim == 1:
            logits, scores, low_res = logits[None], scores[None], low_res[None]
        logits = logits.astype(np.float32, copy=False)
        out.update(
            logits=logits,
            masks=logits > self.predictor.mask_threshold,
            scores=scores.astype(np.float32, copy=False),
            low_res_logits=low_res.astype(np.float32, copy=False),
        )
        return out
