"""``Sam2Model``: the in-process API (embed images, segment them with prompts).

Mirrors the well-known SAM 2 model API (``embed_images`` / ``segment_images`` with
embedding and low-res-mask caches). The remote ``Sam2Client`` offers the same calls.
Device and precision are decided here, never in ``sam2_shared.model``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sam2_shared.embedding import ImageEmbedding, content_id
from sam2_shared.errors import InvalidInputError
from sam2_shared.inference import imaging, transforms
from sam2_shared.inference.caches import (
    Sam2ImageEmbeddingsInMemoryCache,
    Sam2LowResolutionMasksInMemoryCache,
)
from sam2_shared.inference.checkpoints import load_parts
from sam2_shared.model.config import Sam2Config
from sam2_shared.model.parts import Sam2DecoderPart, Sam2EncoderPart
from sam2_shared.model.prompt_encoder import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT
from sam2_shared.prompts import (
    LOW_RES_SIZE,
    Prompt,
    Sam2BatchedPrediction,
    Sam2Prediction,
    prompts_per_image,
)

LOGITS_CLAMP = 32.0  # Meta clamps returned low-res logits to [-32, 32]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Names of the dtypes the mask upscaling may run in (``upscaling_dtype``).
UPSCALING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PARTS = ("all", "encoder", "decoder")


class DeferredMasks:
    """[P, C, H, W] bool masks kept as their low-res logits until asked for, one at a time.

    ``masks[p, c]`` upsamples that one candidate (``imaging.masks_from_low_res``, the same
    function and numbers as the eager path) and nothing else is kept, so a consumer that
    encodes candidate by candidate holds one full-size mask, not P x C of them.
    ``np.asarray(masks)`` still gives the whole array (all at once).
    """

    def __init__(self, low_res_logits: np.ndarray, original_hw: tuple[int, int]) -> None:
        if low_res_logits.ndim != 4:
            raise InvalidInputError(
                f"low-res logits must be [P, C, 256, 256], got {low_res_logits.shape}"
            )
        self._low_res = low_res_logits  # unclamped: clamping first could flip pixels
        self._original_hw = (int(original_hw[0]), int(original_hw[1]))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        prompts, candidates = self._low_res.shape[:2]
        return prompts, candidates, *self._original_hw

    ndim = 4
    dtype = np.dtype(bool)

    def __getitem__(self, index: tuple[int, int]) -> np.ndarray:
        """[H, W] bool mask of prompt ``p``, candidate ``c``."""
        return self.candidate(*index)

    def candidate(self, p: int, c: int, column_major: bool = False) -> np.ndarray:
        """[H, W] bool mask of prompt ``p``, candidate ``c``; ``column_major`` makes it in
        Fortran order, the layout COCO RLE encodes without a copy."""
        return imaging.mask_from_low_res(self._low_res[p, c], self._original_hw, column_major)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        masks = imaging.masks_from_low_res(self._low_res, self._original_hw)
        return masks if dtype is None else masks.astype(dtype)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): on a 2-core
    AVX512-BF16 CPU a [65536, 256] x [256, 256] bf16 matmul took 34-35 ms against 81-90 ms in
    float32 (BENCHMARKS.md); elsewhere bf16 is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    # Private torch helpers (present since 2.1): a torch without them counts as no support.
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_device_and_precision(
    device: str, precision: str, cuda_precision: str = "fp32"
) -> tuple[str, str]:
    """``auto`` device -> cuda when available, else cpu; ``auto`` precision ->
    ``cuda_precision`` on CUDA (the encoder tier asks bf16), fp32 elsewhere. Reduced precision
    on a CPU only when asked for explicitly."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = cuda_precision if torch.device(device).type == "cuda" else "fp32"
    return device, precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """fp16 runs under autocast (LayerNorm, softmax stay fp32: fp16 overflows there)."""
    if precision != "fp16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16)


def _weights_dtype(precision: str) -> torch.dtype:
    """bf16 runs natively in bf16 weights: on CPUs with AVX512-BF16 that is faster than
    autocast (no per-op casts) at the same accuracy; fp16 keeps fp32 weights + autocast."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class _PreparedPrompt:
    """One validated prompt in the 1024 frame, ready to batch."""

    index: int
    coords: np.ndarray | None  # [N, 2] float32, box corners first
    labels: np.ndarray | None  # [N] int32
    mask_input: np.ndarray | None  # [256, 256] float32
    multimask_output: bool

    @property
    def group_key(self) -> tuple[int, bool, bool]:
        """Prompts with equal keys decode in one batched forward."""
        n_points = -1 if self.coords is None else len(self.coords)
        return n_points, self.mask_input is not None, self.multimask_output


class Sam2Model:
    """SAM 2 / SAM 2.1 image segmentation, in process.

    Build with ``from_pretrained``. ``parts="encoder"`` or ``"decoder"`` load only that
    half of the network (the decoder half never holds the Hiera weights).
    """

    def __init__(
        self,
        config: Sam2Config,
        encoder: Sam2EncoderPart | None,
        decoder: Sam2DecoderPart | None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        sam2_image_embeddings_cache: Sam2ImageEmbeddingsInMemoryCache | None = None,
        sam2_low_resolution_masks_cache: Sam2LowResolutionMasksInMemoryCache | None = None,
        max_pixels: int = 100_000_000,
        compile_decoder: bool = False,
        upscaling_dtype: str = "float32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if upscaling_dtype not in UPSCALING_DTYPES:
            raise ValueError(f"upscaling_dtype must be one of {sorted(UPSCALING_DTYPES)}, "
                             f"got {upscaling_dtype!r}")
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        dtype = _weights_dtype(precision)
        self.encoder = encoder.to(self.device, dtype).eval() if encoder is not None else None
        self.decoder = decoder.to(self.device, dtype).eval() if decoder is not None else None
        # Other precisions run the whole network, the upscaling too, in their own dtype.
        self.upscaling_dtype = upscaling_dtype if precision == "fp32" else \
            str(PRECISIONS[precision]).removeprefix("torch.")
        if self.decoder is not None and precision == "fp32":
            self.decoder.sam_mask_decoder.set_upscaling_dtype(UPSCALING_DTYPES[upscaling_dtype])
        if compile_decoder and self.decoder is not None:
            # One-click decodes through torch.compile; the first one compiles (seconds).
            self.decoder.sam_mask_decoder.compile_one_prompt_upscaling()
        self.embeddings_cache = sam2_image_embeddings_cache
        self.low_res_masks_cache = sam2_low_resolution_masks_cache
        self.max_pixels = max_pixels

    @property
    def model_id(self) -> str:
        return self.config.model_id

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        checkpoint: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        parts: str = "all",
        precision: str = "fp32",
        sam2_image_embeddings_cache: Sam2ImageEmbeddingsInMemoryCache | None = None,
        sam2_low_resolution_masks_cache: Sam2LowResolutionMasksInMemoryCache | None = None,
        cache_dir: str | os.PathLike | None = None,
        download: bool = True,
        max_pixels: int = 100_000_000,
        compile_decoder: bool = False,
        upscaling_dtype: str = "float32",
    ) -> Sam2Model:
        """Load an official model id (e.g. ``"sam2.1/hiera_b_plus"``) from its checkpoint.

        ``checkpoint`` is a path; without it the file is looked up in ``cache_dir``
        (``$SAM2_CHECKPOINT_DIR`` or ``~/.cache/sam2``) and downloaded from Meta if absent.
        ``compile_decoder``: one-prompt decodes run their upscaling through ``torch.compile``
        (faster clicks; the first decode compiles for seconds; a CPU needs a C++ compiler).
        ``upscaling_dtype="bfloat16"`` (with fp32 precision): the mask upscaling runs in
        bfloat16, the rest in float32 (the decoder tier's default on CPUs with native bf16;
        masks near but not equal to float32's, see BENCHMARKS.md).
        """
        if parts not in _PARTS:
            raise ValueError(f"parts must be one of {_PARTS}, got {parts!r}")
        wanted = ("encoder", "decoder") if parts == "all" else (parts,)
        config, modules = load_parts(model_id, wanted, checkpoint, cache_dir=cache_dir,
                                     download=download)
        encoder, decoder = modules.get("encoder"), modules.get("decoder")
        return cls(
            config,
            encoder,
            decoder,
            device=device,
            precision=precision,
            sam2_image_embeddings_cache=sam2_image_embeddings_cache,
            sam2_low_resolution_masks_cache=sam2_low_resolution_masks_cache,
            max_pixels=max_pixels,
            compile_decoder=compile_decoder,
            upscaling_dtype=upscaling_dtype,
        )

    # ------------------------------------------------------------------ encoding

    def decode_image(self, image: Any, input_color_format: str = "bgr") -> np.ndarray:
        """Any accepted image input -> HxWx3 uint8 RGB (see ``imaging.decode_image``)."""
        return imaging.decode_image(image, input_color_format, max_pixels=self.max_pixels)

    def embedding_id(self, rgb: np.ndarray) -> str:
        return content_id(rgb, self.model_id)

    @torch.inference_mode()
    def encode_rgb(
        self, rgbs: Sequence[np.ndarray], ids: Sequence[str] | None = None
    ) -> list[ImageEmbedding]:
        """Run the image encoder on decoded RGB images as one batch (no caches)."""
        if self.encoder is None:
            raise RuntimeError("this Sam2Model was built without the encoder part")
        ids = list(ids) if ids is not None else [self.embedding_id(rgb) for rgb in rgbs]
        batch = transforms.preprocess_images(rgbs).to(self.device, _weights_dtype(self.precision))
        with _autocast(self.device, self.precision):
            image_embed, feat_s0, feat_s1 = self.encoder(batch)
        out = []
        # Hand out embeddings the decoder can use as they are (its dtype, channels_last),
        # so clicks don't convert 16 MiB per call; without a decoder, float32.
        dtype = torch.float32 if self.decoder is None else _weights_dtype(self.precision)

        def finish(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype).contiguous(memory_format=torch.channels_last)

        for i, rgb in enumerate(rgbs):
            out.append(
                ImageEmbedding(
                    image_embed=finish(image_embed[i : i + 1]),
                    high_res_feats=(finish(feat_s0[i : i + 1]), finish(feat_s1[i : i + 1])),
                    original_hw=(int(rgb.shape[0]), int(rgb.shape[1])),
                    model_id=self.model_id,
                    embedding_id=ids[i],
                )
            )
        return out

    def embed_images(
        self,
        images: Any,
        use_embeddings_cache: bool = True,
        input_color_format: str = "bgr",
    ) -> list[ImageEmbedding]:
        """Embed one image or a list of images; returns one ``ImageEmbedding`` each.

        Images: numpy HxWx3 uint8 (BGR unless ``input_color_format="rgb"``), gray or
        4-channel arrays, encoded bytes, file paths or PIL images.
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InvalidInputError("no images given")
        rgbs = [self.decode_image(item, input_color_format) for item in items]
        ids = [self.embedding_id(rgb) for rgb in rgbs]
        results: list[ImageEmbedding | None] = [None] * len(items)
        if use_embeddings_cache and self.embeddings_cache is not None:
            for i, key in enumerate(ids):
                results[i] = self.embeddings_cache.retrieve_embeddings(key, device=self.device)
        todo = [i for i, found in enumerate(results) if found is None]
        if todo:
            computed = self.encode_rgb([rgbs[i] for i in todo], [ids[i] for i in todo])
            for i, embedding in zip(todo, computed):
                results[i] = embedding
                if use_embeddings_cache and self.embeddings_cache is not None:
                    self.embeddings_cache.save_embeddings(ids[i], embedding)
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ decoding

    def _prepare(self, index: int, prompt: Prompt, embedding: ImageEmbedding) -> _PreparedPrompt:
        imaging.validate_prompt(prompt, embedding.original_hw)
        coords_parts, label_parts = [], []
        if prompt.box is not None:
            corners = imaging.boxes_to_points(np.asarray(prompt.box, dtype=np.float32).reshape(4))
            coords_parts.append(corners[0])
            label_parts.append(np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.int32))
        if prompt.point_coords is not None and len(prompt.point_coords) > 0:
            coords_parts.append(np.asarray(prompt.point_coords, dtype=np.float32).reshape(-1, 2))
            label_parts.append(np.asarray(prompt.point_labels, dtype=np.int32).reshape(-1))
        coords = labels = None
        if coords_parts:
            coords = imaging.points_to_model_frame(
                np.concatenate(coords_parts), embedding.original_hw
            )
            labels = np.concatenate(label_parts)
        mask = None
        if prompt.mask_input is not None:
            mask = np.asarray(prompt.mask_input, dtype=np.float32).reshape(
                LOW_RES_SIZE, LOW_RES_SIZE
            )
        return _PreparedPrompt(index, coords, labels, mask, bool(prompt.multimask_output))

    def prepare_embedding(self, embedding: ImageEmbedding) -> ImageEmbedding:
        """The embedding on this model's device, in the decoder's dtype and channels_last.

        The decoder works token-major; channels_last maps make that a free view. A no-op
        for embeddings already prepared (callers holding a hot cache keep these).
        """
        dtype = next(self.decoder.parameters()).dtype if self.decoder is not None else None
        moved = embedding.to(self.device, dtype)

        def channels_last(t: torch.Tensor) -> torch.Tensor:
            return t.contiguous(memory_format=torch.channels_last)

        return ImageEmbedding(
            image_embed=channels_last(moved.image_embed),
            high_res_feats=(
                channels_last(moved.high_res_feats[0]),
                channels_last(moved.high_res_feats[1]),
            ),
            original_hw=moved.original_hw,
            model_id=moved.model_id,
            embedding_id=moved.embedding_id,
        )

    @torch.inference_mode()
    def decode_prompts(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[Prompt],
        use_mask_input_cache: bool = False,
        deferred_masks: bool = False,
    ) -> list[Sam2BatchedPrediction]:
        """Decode several prompts on one image; one numpy ``Sam2BatchedPrediction`` (P = 1)
        per prompt (the tiers' entry point; ``segment_images`` is the user's).

        With ``deferred_masks`` each prediction's ``masks`` is a ``DeferredMasks``: no
        full-size mask is made here, each is upsampled when indexed (the decoder tier encodes
        them for the wire one at a time). Otherwise a [1, C, H, W] bool array.

        Prompts with the same number of points, mask presence and multimask flag run
        in one batched decoder forward; the image side is shared, not repeated.
        """
        if self.decoder is None:
            raise RuntimeError("this Sam2Model was built without the decoder part")
        if embedding.model_id != self.model_id:
            raise InvalidInputError(
                f"embedding was computed by {embedding.model_id}, this model is {self.model_id}"
            )
        if not prompts:
            raise InvalidInputError("no prompts given")
        prompts = list(prompts)
        cache = self.low_res_masks_cache if use_mask_input_cache else None
        if cache is not None:
            for i, prompt in enumerate(prompts):
                if prompt.mask_input is None:
                    earlier = cache.find_refinement(embedding.embedding_id, prompt)
                    if earlier is not None:
                        prompts[i] = Prompt(
                            prompt.point_coords, prompt.point_labels, prompt.box, earlier,
                            prompt.multimask_output,
                        )
        prepared = [self._prepare(i, p, embedding) for i, p in enumerate(prompts)]
        groups: dict[tuple[int, bool, bool], list[_PreparedPrompt]] = {}
        for item in prepared:
            groups.setdefault(item.group_key, []).append(item)

        embedding = self.prepare_embedding(embedding)
        results: list[Sam2BatchedPrediction | None] = [None] * len(prompts)
        for items in groups.values():
            decoded = self._decode_group(embedding, items, deferred_masks)
            for item, prediction in zip(items, decoded):
                results[item.index] = prediction
        if cache is not None:
            for prompt, prediction in zip(prompts, results):
                best = int(prediction.scores[0].argmax())
                cache.save_mask(embedding.embedding_id, prompt, prediction.logits[0, best])
        return results  # type: ignore[return-value]

    def _decode_group(
        self, embedding: ImageEmbedding, items: list[_PreparedPrompt], deferred_masks: bool
    ) -> list[Sam2BatchedPrediction]:
        device = self.device
        coords = labels = masks = None
        if items[0].coords is not None:
            coords = torch.from_numpy(np.stack([it.coords for it in items])).to(device)
            labels = torch.from_numpy(np.stack([it.labels for it in items])).to(device)
        if items[0].mask_input is not None:
            masks = torch.from_numpy(np.stack([it.mask_input for it in items]))[:, None]
            masks = masks.to(device, embedding.image_embed.dtype)
        with _autocast(device, self.precision):
            out = self.decoder(
                embedding.image_embed,
                embedding.high_res_feats,
                coords,
                labels,
                masks,
                items[0].multimask_output,
                batch_size=len(items),
            )
        low_res = out.masks.float().cpu().numpy()
        if deferred_masks:
            full_size: list[Any] = [DeferredMasks(low_res[i : i + 1], embedding.original_hw)
                                    for i in range(len(items))]
        else:
            all_masks = imaging.masks_from_low_res(low_res, embedding.original_hw)
            full_size = [all_masks[i : i + 1] for i in range(len(items))]
        logits = np.clip(low_res, -LOGITS_CLAMP, LOGITS_CLAMP)
        scores = out.iou_scores.float().cpu().numpy()
        objects = out.object_score_logits.float().reshape(-1).cpu().numpy()
        return [
            Sam2BatchedPrediction(
                masks=full_size[i],
                scores=scores[i : i + 1],
                logits=logits[i : i + 1],
                object_score_logits=objects[i : i + 1],
            )
            for i in range(len(items))
        ]

    def segment_images(
        self,
        images: Any = None,
        embeddings: ImageEmbedding | Sequence[ImageEmbedding] | None = None,
        point_coordinates: Any = None,
        point_labels: Any = None,
        boxes: Any = None,
        mask_input: Any = None,
        multimask_output: bool = True,
        use_embeddings_cache: bool = True,
        use_mask_input_cache: bool = True,
        input_color_format: str = "bgr",
    ) -> list[Sam2Prediction]:
        """Segment one image or a list of images; one ``Sam2Prediction`` per image.

        Prompts are in original pixels, as arrays, tensors or nested lists. Per image:
        ``point_coordinates`` [N, 2] with ``point_labels`` [N] is one prompt, [B, N, 2] with
        [B, N] is B prompts; ``boxes`` [4] / [1, 4] one, [B, 4] B (one box per point set when
        both are given); ``mask_input`` [256, 256] / [1, 256, 256] one, [B, 256, 256] /
        [B, 1, 256, 256] B: one candidate's low-res logits each (``logits[scores.argmax()]``).
        With several images, a bare array is used for every image, a list of length 1 is
        broadcast and a list of length N gives each image its own entry.

        Returns per image: one prompt -> ``masks`` (C, H, W) bool, ``scores`` (C,),
        ``logits`` (C, 256, 256), ``object_score_logits`` (); B prompts add a leading B axis
        (``.batched`` always has it). C is 3 with ``multimask_output``, else 1. Tensors are
        on this model's device.
        """
        given = images if embeddings is None else embeddings
        if given is None:
            raise InvalidInputError("give images or embeddings")
        n_images = len(given) if isinstance(given, (list, tuple)) else 1
        # Prompt arguments are checked before any image is decoded or encoded.
        per_image = prompts_per_image(
            n_images, point_coordinates, point_labels, boxes, mask_input, multimask_output,
        )
        if embeddings is None:
            embeddings = self.embed_images(images, use_embeddings_cache, input_color_format)
        elif not isinstance(embeddings, (list, tuple)):
            embeddings = [embeddings]
        return [
            self._for_user(Sam2BatchedPrediction.concatenate(
                self.decode_prompts(embedding, prompts, use_mask_input_cache)))
            for embedding, prompts in zip(embeddings, per_image)
        ]

    def _for_user(self, prediction: Sam2BatchedPrediction) -> Sam2Prediction:
        """numpy [P, C, ...] -> the user's ``Sam2Prediction`` of tensors on this device."""
        def to_tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device)

        return Sam2Prediction.from_batched(prediction.converted(to_tensor))
