"""Typed configurations of the eight official SAM 2 / SAM 2.1 models.

Values are those of Meta's Hydra configs (``configs/sam2/sam2_hiera_*.yaml`` and
``configs/sam2.1/sam2.1_hiera_*.yaml``). The image path is identical in SAM 2 and
SAM 2.1; they differ only in video-memory flags, recorded here for the tracker.
"""

from __future__ import annotations

from dataclasses import dataclass

from sam2_shared.errors import UnknownModelError

IMAGE_SIZE = 1024  # the square model input frame
BACKBONE_STRIDE = 16  # image embedding is IMAGE_SIZE / 16 = 64 per side
EMBED_DIM = 256  # neck / prompt / decoder width


@dataclass(frozen=True)
class HieraConfig:
    """Hiera trunk hyper-parameters (``sam2/modeling/backbones/hieradet.py``)."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> list[int]:
        """Index of the last block of each stage."""
        return [sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages))]

    @property
    def channel_list(self) -> list[int]:
        """Output channels per stage, lowest resolution first (as the FPN neck wants)."""
        dims = [int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages))]
        return dims[::-1]


@dataclass(frozen=True)
class Sam2Config:
    """One official model: trunk, neck and the SAM heads (fixed for all sizes)."""

    model_id: str
    trunk: HieraConfig
    checkpoint_url: str
    # SAM 2.1 video-memory additions (absent in SAM 2).
    no_obj_embed_spatial: bool = False
    proj_tpos_enc_in_obj_ptrs: bool = False
    use_signed_tpos_enc_to_obj_ptrs: bool = False
    add_tpos_enc_to_obj_ptrs: bool = False
    # Image path constants shared by every size.
    image_size: int = IMAGE_SIZE
    embed_dim: int = EMBED_DIM
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    # Stability fallback for single-mask output (build_sam2 post-processing defaults).
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // BACKBONE_STRIDE

    @property
    def family(self) -> str:
        return self.model_id.split("/")[0]

    @property
    def checkpoint_filename(self) -> str:
        return self.checkpoint_url.rsplit("/", 1)[1]


_TRUNKS = {
    "hiera_tiny": HieraConfig(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 7, 2),
        global_att_blocks=(5, 7, 9),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "hiera_small": HieraConfig(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 11, 2),
        global_att_blocks=(7, 10, 13),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "hiera_b_plus": HieraConfig(
        embed_dim=112,
        num_heads=2,
        stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20),
        window_pos_embed_bkg_spatial_size=(14, 14),
    ),
    "hiera_large": HieraConfig(
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_pos_embed_bkg_spatial_size=(7, 7),
        window_spec=(8, 4, 16, 8),
    ),
}

_URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2"
_RELEASES = {
    "sam2": ("072824", "sam2_", {}),
    "sam2.1": (
        "092824",
        "sam2.1_",
        {
            "no_obj_embed_spatial": True,
            "proj_tpos_enc_in_obj_ptrs": True,
            "use_signed_tpos_enc_to_obj_ptrs": True,
            "add_tpos_enc_to_obj_ptrs": True,
        },
    ),
}


def _build_registry() -> dict[str, Sam2Config]:
    registry = {}
    for family, (date, prefix, flags) in _RELEASES.items():
        for size, trunk in _TRUNKS.items():
            model_id = f"{family}/{size}"
            # Meta's file names spell b_plus out as "base_plus".
            file_size = size.replace("b_plus", "base_plus")
            url = f"{_URL_BASE}/{date}/{prefix}{file_size}.pt"
            registry[model_id] = Sam2Config(
                model_id=model_id, trunk=trunk, checkpoint_url=url, **flags
            )
    return registry


MODEL_CONFIGS: dict[str, Sam2Config] = _build_registry()


# Meta's config files and checkpoints spell sizes t / s / b+ / l and tiny / small /
# base_plus / large; Hugging Face ids use facebook/sam2.1-hiera-tiny.
_SIZE_SPELLINGS = {
    "hiera_tiny": ("hiera_t", "hiera_tiny"),
    "hiera_small": ("hiera_s", "hiera_small"),
    "hiera_b_plus": ("hiera_b+", "hiera_base_plus", "hiera_b_plus"),
    "hiera_large": ("hiera_l", "hiera_large"),
}


def _aliases() -> dict[str, str]:
    aliases = {}
    for family in _RELEASES:
        for size, spellings in _SIZE_SPELLINGS.items():
            for spelling in spellings:
                aliases[f"{family}_{spelling}"] = f"{family}/{size}"
                aliases[f"{family}/{spelling}"] = f"{family}/{size}"
                aliases[f"facebook/{family}-{spelling.replace('_', '-')}"] = f"{family}/{size}"
    return aliases


MODEL_ID_ALIASES: dict[str, str] = _aliases()


def canonical_model_id(model_id: str) -> str:
    """The official id (``"sam2.1/hiera_b_plus"``) of any accepted spelling of a model.

    Accepted: the official ids; Meta's config and checkpoint file names with or without
    their folder and extension (``sam2.1_hiera_b+``, ``configs/sam2/sam2_hiera_t.yaml``,
    ``sam2.1_hiera_base_plus.pt``); Hugging Face ids (``facebook/sam2.1-hiera-tiny``).
    """
    if model_id in MODEL_CONFIGS:
        return model_id
    name = model_id.strip()
    if name in MODEL_ID_ALIASES:
        return MODEL_ID_ALIASES[name]
    if not name.startswith("facebook/"):
        name = name.rsplit("/", 1)[-1]
        for extension in (".yaml", ".pt"):
            name = name.removesuffix(extension)
    if name in MODEL_ID_ALIASES:
        return MODEL_ID_ALIASES[name]
    known = ", ".join(sorted(MODEL_CONFIGS))
    raise UnknownModelError(
        f"unknown model id {model_id!r}; known models: {known} (Meta's file names such as "
        "'sam2.1_hiera_b+' and Hugging Face ids such as 'facebook/sam2.1-hiera-tiny' work too)",
        model_id=model_id,
    )


def get_config(model_id: str) -> Sam2Config:
    """Config of an official model id such as ``"sam2.1/hiera_b_plus"`` (or any spelling
    ``canonical_model_id`` accepts)."""
    return MODEL_CONFIGS[canonical_model_id(model_id)]
