"""Official checkpoint files: find them, read them, load the parts a tier needs.

Meta's files are ``torch.save({"model": state_dict})`` with ``SAM2Base`` key names.
Loading is strict: every key a part needs must be present with the right shape, and
every key in the file must belong to the official model of that id (the image
keys we load plus the video-memory keys we don't use here).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from sam2_shared.errors import CheckpointError
from sam2_shared.model.build import build_part
from sam2_shared.model.config import Sam2Config, get_config

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("SAM2_CHECKPOINT_DIR", Path.home() / ".cache" / "sam2"))

# Keys the encoder part reads under another name: Meta applies these decoder convs
# at encode time (checkpoint key prefix -> our module prefix).
_ENCODER_RENAMES = {
    "sam_mask_decoder.conv_s0.": "conv_s0.",
    "sam_mask_decoder.conv_s1.": "conv_s1.",
}

# Video-memory keys present in every official file (not used by the image path).
_VIDEO_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "obj_ptr_proj.",
    "mask_downsample.",
)
_VIDEO_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr")
_SAM21_ONLY_PREFIXES = ("obj_ptr_tpos_proj.", "no_obj_embed_spatial")


def resolve_checkpoint(
    config: Sam2Config,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """Path of the checkpoint file for a model id.

    Order: an explicit ``checkpoint`` path; ``<cache_dir>/<official file name>``
    (default ``$SAM2_CHECKPOINT_DIR`` or ``~/.cache/sam2``); a download from Meta's
    published URL into the cache dir (when ``download`` and a network exist).

    A downloaded file's SHA-256 is pinned next to it (``<file>.sha256``) and checked each
    time the cached file is used, so a file changed or truncated on a shared volume is
    refused instead of loaded. Processes sharing one cache dir (an encoder and a decoder
    starting together) take turns: one downloads, the others wait and then use its file.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {str(path)!r} does not exist", path=path)
        return path
    directory = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    path = directory / config.checkpoint_filename
    if path.is_file():
        _check_pinned_digest(path)
        return path
    where = (
        f"Download {config.checkpoint_url} and put it at {path}, set SAM2_CHECKPOINT_DIR to "
        f"the folder holding {config.checkpoint_filename}, or pass checkpoint=PATH "
        "(--checkpoint / SAM2_CHECKPOINT for the servers)."
    )
    if not download:
        raise CheckpointError(f"no checkpoint for {config.model_id}. {where}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _directory_lock(directory):
            # Another process may have finished the download while this one waited.
            if not path.is_file():
                _download(config.checkpoint_url, path)
    except OSError as exc:
        raise CheckpointError(
            f"could not download the checkpoint for {config.model_id} ({exc}). {where}"
        ) from exc
    _check_pinned_digest(path)
    return path


def pinned_digest_path(path: Path) -> Path:
    """Where the SHA-256 of a downloaded checkpoint is kept (hex, one line)."""
    return path.with_name(path.name + ".sha256")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _check_pinned_digest(path: Path) -> None:
    """Refuse a cached download whose bytes no longer match the digest pinned at download."""
    pin_path = pinned_digest_path(path)
    if not pin_path.is_file():
        return  # a file put there by hand: nothing was pinned for it
    pinned = pin_path.read_text(encoding="ascii", errors="replace").strip().lower()
    actual = _file_sha256(path)
    if actual != pinned:
        raise CheckpointError(
            f"{path} changed since it was downloaded (sha256 {actual}, pinned {pinned} in "
            f"{pin_path}); delete both files to download it again",
            path=path,
        )


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the cache directory itself (no lock file left behind).

    The kernel drops it when the holder exits, so a crashed download never blocks others.
    """
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _download(url: str, path: Path, timeout_s: float = 30.0) -> None:
    """Download to a unique temporary name, check it is a readable torch file, then rename.

    The temporary name is unique per call, so two writers (even without the directory lock,
    e.g. on a filesystem where ``flock`` is advisory only) never write into one file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".part"
    )
    partial = Path(partial_name)
    log.info("downloading %s to %s", url, path)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, os.fdopen(
            descriptor, "wb"
        ) as out:
            expected = int(response.headers.get("Content-Length") or 0)
            received = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if expected and received != expected:
        partial.unlink(missing_ok=True)
        raise OSError(f"download truncated: {received} of {expected} bytes")
    # Meta publishes no checksums; a torch archive carries CRCs per record, which
    # zipfile verifies, so a corrupted transfer is caught here.
    try:
        with zipfile.ZipFile(partial) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        partial.unlink(missing_ok=True)
        raise OSError(f"downloaded file is not a torch checkpoint: {exc}") from exc
    if bad is not None:
        partial.unlink(missing_ok=True)
        raise OSError(f"downloaded file is corrupt (bad CRC in {bad})")
    os.chmod(partial, 0o644)  # mkstemp makes it 0600; the other tier may run as another user
    # Pin first, then publish: a reader that sees the checkpoint also sees its digest.
    pinned_digest_path(path).write_text(digest.hexdigest() + "\n", encoding="ascii")
    os.replace(partial, path)
    log.info("downloaded %s (%d bytes, sha256 %s)", path, received, digest.hexdigest())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load(path)["model"]`` with errors that say what is wrong with the file."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for bad files
        raise CheckpointError(
            f"{path} is not a readable SAM 2 checkpoint (torch.load failed: {exc}); "
            "the file may be truncated or not a PyTorch checkpoint",
            path=path,
        ) from exc
    if not isinstance(blob, Mapping) or "model" not in blob:
        found = sorted(blob)[:5] if isinstance(blob, Mapping) else type(blob).__name__
        raise CheckpointError(
            f"{path} is not an official SAM 2 checkpoint: expected a dict with a 'model' "
            f"state dict, found {found}",
            path=path,
        )
    state = blob["model"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'model' is not a state dict", path=path)
    return dict(state)


def _check_whole_file(state: Mapping[str, torch.Tensor], config: Sam2Config, path: Path) -> None:
    """The file must be the official checkpoint of this id, whichever part is loaded.

    Checks every image-path key (present, right shape) and that no key is foreign, from
    shapes alone, so a decoder process validates the Hiera keys without loading them.
    """
    expected = dict(expected_checkpoint_keys(config, "encoder"))
    expected.update(expected_checkpoint_keys(config, "decoder"))
    missing = [key for key in expected if key not in state]
    wrong_shape = [
        f"{key}: file {tuple(state[key].shape)} vs model {shape}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    is_sam21 = config.family == "sam2.1"
    unexpected = []
    for key in state:
        if key in expected or key in _VIDEO_KEYS or key.startswith(_VIDEO_PREFIXES):
            continue
        if key.startswith(_SAM21_ONLY_PREFIXES) and is_sam21:
            continue
        unexpected.append(key)
    missing_sam21 = [
        prefix
        for prefix in _SAM21_ONLY_PREFIXES
        if is_sam21 and not any(key.startswith(prefix) for key in state)
    ]
    if not (missing or wrong_shape or unexpected or missing_sam21):
        return
    if missing or wrong_shape:
        hint = " (is it the checkpoint of another model size?)"
    elif any(key.startswith(_SAM21_ONLY_PREFIXES) for key in unexpected):
        hint = f" (this looks like a SAM 2.1 checkpoint; use the sam2.1/ id, not {config.model_id})"
    elif missing_sam21:
        hint = f" (this looks like a SAM 2 checkpoint; use the sam2/ id, not {config.model_id})"
    else:
        hint = ""
    raise CheckpointError(
        f"{path} does not match {config.model_id}{hint}: missing keys "
        f"{_preview(missing + missing_sam21)}; wrong shapes {_preview(wrong_shape, 4)}; "
        f"unexpected keys {_preview(unexpected)}",
        path=path,
    )


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def _to_checkpoint_key(part: str, module_key: str) -> str:
    if part == "encoder":
        for ckpt_prefix, module_prefix in _ENCODER_RENAMES.items():
            if module_key.startswith(module_prefix):
                return ckpt_prefix + module_key[len(module_prefix) :]
    return module_key


def expected_checkpoint_keys(config: Sam2Config, part: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for the tensors a part ("encoder"/"decoder") loads."""
    with torch.device("meta"):
        module = build_part(config, part)
    return {_to_checkpoint_key(part, k): tuple(v.shape) for k, v in module.state_dict().items()}


def load_part(
    module: nn.Module, part: str, state: Mapping[str, torch.Tensor], path: Path | str = "<memory>"
) -> None:
    """Strictly load one part from a full official state dict (checks keys and shapes)."""
    config = module.config
    _check_whole_file(state, config, Path(path))
    own = module.state_dict()
    selected: dict[str, torch.Tensor] = {}
    missing, wrong_shape = [], []
    for module_key, tensor in own.items():
        ckpt_key = _to_checkpoint_key(part, module_key)
        if ckpt_key not in state:
            missing.append(ckpt_key)
            continue
        value = state[ckpt_key]
        if tuple(value.shape) != tuple(tensor.shape):
            wrong_shape.append(
                f"{ckpt_key}: file {tuple(value.shape)} vs model {tuple(tensor.shape)}"
            )
            continue
        selected[module_key] = value
    if missing or wrong_shape:
        raise CheckpointError(
            f"{path} does not fit {config.model_id} ({part} part): missing keys "
            f"{_preview(missing)}; wrong shapes {_preview(wrong_shape, 4)} — is it the "
            "checkpoint of another model size?",
            path=path,
        )
    module.load_state_dict(selected, strict=True)


def load_parts(
    model_id: str,
    parts: tuple[str, ...],
    checkpoint: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[Sam2Config, dict[str, nn.Module]]:
    """Build ``parts`` (of ``"encoder"``, ``"decoder"``, ``"tracker"``) of ``model_id`` and
    load them strictly from its official checkpoint (path, cache dir or download)."""
    config = get_config(model_id)
    path = resolve_checkpoint(config, checkpoint, cache_dir=cache_dir, download=download)
    state = read_state_dict(path)
    modules = {}
    for part in parts:
        module = build_part(config, part)
        load_part(module, part, state, path)
        modules[part] = module
    del state
    return config, modules
