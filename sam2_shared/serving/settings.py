"""One way to define a tier's settings: flags and environment variables with the same names.

A tier declares a frozen dataclass, derived from ``TierSettings`` (the settings every tier
has: model, store, listener, TLS, API keys, logging), whose own fields are made with
``setting(...)``::

    @dataclass(frozen=True)
    class EncoderSettings(TierSettings):
        port: int = setting(50051, "gRPC port (0 picks a free one)", minimum=0)
        max_batch_size: int = setting(4, "images per encoder forward", minimum=1)

    settings = load_settings(EncoderSettings, argv)   # --max-batch-size / SAM2_MAX_BATCH_SIZE
    log.info("settings: %s", describe_settings(settings))

Precedence: command-line flag, then environment variable, then the field default. Field
types supported: ``str``, ``int``, ``float``, ``bool`` (``--x`` / ``--no-x``; env
``1/true/yes/on`` or ``0/false/no/off``) and ``T | None`` of those (an empty env value or
``--x ''`` means None). Checks that involve several fields go in the dataclass's
``__post_init__`` and raise ``ValueError``; ``load_settings`` turns that into a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sam2_shared.errors import UnknownModelError
from sam2_shared.model.config import canonical_model_id
from sam2_shared.serving.server import DEFAULT_GRACE_S, DEFAULT_MAX_CONCURRENT_RPCS
from sam2_shared.serving.tls import tls_server_settings
from sam2_shared.store.base import mask_url
from sam2_shared.units import MIB

ENV_PREFIX = "SAM2_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

SettingsT = TypeVar("SettingsT")


def setting(
    default: Any,
    help: str,
    *,
    env: str | None = None,
    secret: bool = False,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
) -> Any:
    """A dataclass field that is also a flag and an environment variable.

    Arguments:
        default: value when neither the flag nor the variable is given.
        help: one line for ``--help``.
        env: variable name; default ``SAM2_<FIELD_NAME>``.
        secret: mask the value when printed (URLs keep everything but the password and
            secret-looking query values; other values become ``***``).
        choices: allowed values.
        minimum: lowest allowed value of a number.
    """
    metadata = {"help": help, "env": env, "secret": secret, "choices": choices, "minimum": minimum}
    return dataclasses.field(default=default, metadata=metadata)


def env_name(field: dataclasses.Field) -> str:
    return field.metadata.get("env") or ENV_PREFIX + field.name.upper()


def flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``int`` -> (int, False); ``int | None`` -> (int, True)."""
    args = typing.get_args(annotation)
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if is_union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in (str, int, float, bool):
            return rest[0], True
    if annotation in (str, int, float, bool):
        return annotation, False
    raise TypeError(f"unsupported settings field type {annotation!r}")


def _convert(text: str, base: type, optional: bool) -> Any:
    """Parse one flag or env value; raises ValueError with a readable message."""
    if optional and text == "":
        return None
    if base is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}, got {text!r}")
    try:
        return base(text)
    except ValueError:
        raise ValueError(f"expected {base.__name__}, got {text!r}") from None


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def build_parser(
    cls: type, env: Mapping[str, str] | None = None, prog: str | None = None,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """The argparse parser of ``cls``, with defaults already taken from ``env``."""
    environ = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field, base, optional in _fields(cls):
        name = env_name(field)
        default = field.default
        if name in environ:
            try:
                default = _convert(environ[name], base, optional)
            except ValueError as exc:
                parser.error(f"environment variable {name}: {exc}")
        shown = mask_secret(default) if field.metadata.get("secret") else repr(default)
        help_text = f"{field.metadata.get('help', '')} [env {name}; default {shown}]"
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": default,
            "help": help_text.replace("%", "%%"),
        }
        if base is bool and not optional:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _argparse_type(base, optional)
            choices = field.metadata.get("choices")
            if choices is not None:
                kwargs["choices"] = list(choices)
            else:
                kwargs["metavar"] = base.__name__.upper()
        parser.add_argument(flag_name(field), **kwargs)
    return parser


def _argparse_type(base: type, optional: bool) -> Any:
    def parse(text: str) -> Any:
        try:
            return _convert(text, base, optional)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def _check_field(field: dataclasses.Field, value: Any) -> None:
    choices = field.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise ValueError(
            f"{flag_name(field)} / {env_name(field)} must be one of "
            f"{', '.join(map(str, choices))}, got {value!r}"
        )
    minimum = field.metadata.get("minimum")
    if minimum is not None and value is not None and value < minimum:
        raise ValueError(
            f"{flag_name(field)} / {env_name(field)} must be >= {minimum}, got {value!r}"
        )


def load_settings(
    cls: type[SettingsT],
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> SettingsT:
    """Parse ``argv`` (default ``sys.argv[1:]``) and ``env`` (default ``os.environ``) into
    ``cls``. Bad values exit with a usage error (status 2) naming the flag and variable."""
    parser = build_parser(cls, env, prog=prog, description=description)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    try:
        for field, _, _ in _fields(cls):
            _check_field(field, values[field.name])
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def mask_secret(value: Any) -> str:
    if value is None:
        return "None"
    text = str(value)
    if "://" in text:
        parts = urlsplit(text)
        return mask_url(text) if parts.password is not None or parts.query else text
    return "***" if text else ""


def describe_settings(settings: Any) -> str:
    """``name=value`` pairs of a settings object on one line, secrets masked."""
    parts = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        shown = mask_secret(value) if field.metadata.get("secret") else repr(value)
        parts.append(f"{field.name}={shown}")
    return " ".join(parts)


DEFAULT_STORE = "diskcache://" + os.path.join(tempfile.gettempdir(), "sam2-embeddings")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TierSettings:
    """What every tier is configured with. Tiers derive from it, set their own ports and
    defaults by redeclaring a field, and add their own fields after these."""

    model: str = setting("sam2.1/hiera_tiny", "official model id, e.g. sam2.1/hiera_b_plus")
    checkpoint: str | None = setting(
        None, "checkpoint file; default: the model's file in $SAM2_CHECKPOINT_DIR or "
        "~/.cache/sam2, downloaded from Meta if missing"
    )
    store: str = setting(
        DEFAULT_STORE, "embedding store URL: diskcache:///path, redis://host:port/db or "
        "s3://bucket/prefix?endpoint_url=...", secret=True
    )
    host: str = setting("0.0.0.0", "address to listen on; without --api-keys-file only a "
                        "loopback one (127.0.0.1, ::1) unless --allow-unauthenticated")
    port: int = setting(0, "gRPC port (0 picks a free one)", minimum=0)
    health_port: int = setting(
        0, "plaintext port on --host serving only gRPC health, for probes that cannot speak "
        "TLS (the kubelet's); 0: none", minimum=0)
    metrics_port: int = setting(0, "Prometheus metrics port (0 disables)", minimum=0)
    http_port: int | None = setting(
        None, "HTTP/1.1 port on --host serving the same API over Connect (JSON or binary) and "
        "gRPC-Web, through the same API keys and limits (0 picks a free one); unset: none",
        minimum=0)
    http_cors_origins: str = setting(
        "", "comma-separated origins browsers may call the HTTP port from "
        "(https://app.example.com; * for any); empty: none")
    device: str = setting("auto", "torch device: auto, cpu, cuda, cuda:1 ...")
    precision: str = setting("auto", "model precision", choices=PRECISIONS)
    max_message_mb: int = setting(64, "largest gRPC message in MiB", minimum=1)
    max_image_pixels: int = setting(100_000_000, "largest decoded image (pixels)", minimum=1)
    grace_s: float = setting(DEFAULT_GRACE_S, "drain time on SIGTERM (seconds)", minimum=0)
    max_concurrent_rpcs: int = setting(
        DEFAULT_MAX_CONCURRENT_RPCS, "most RPCs in progress at once (open streams included); "
        "beyond, RESOURCE_EXHAUSTED; 0: no limit", minimum=0)
    api_keys_file: str | None = setting(
        None, "file (one '<key> [namespace]' per line) or directory (a Kubernetes Secret, one "
        "key per file) of accepted API keys, reloaded on change (emptied or deleted: every "
        "key refused); unset: no authentication")
    allow_unauthenticated: bool = setting(
        False, "serve without --api-keys-file on a non-loopback --host (something in front "
        "authenticates callers); refused otherwise")
    tls_cert: str | None = setting(None, "PEM certificate (chain) of this server: enables TLS")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = setting(
        None, "PEM CA of client certificates: enables mutual TLS (needs --tls-cert)")
    reflection: bool = setting(True, "enable gRPC server reflection")
    log_level: str = setting("INFO", "logging level",
                             choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        try:  # any accepted spelling; the tier runs under the official id
            object.__setattr__(self, "model", canonical_model_id(self.model))
        except UnknownModelError as exc:
            raise ValueError(f"--model / SAM2_MODEL: {exc}") from None

    def server_options(self) -> dict[str, Any]:
        """The listener's keyword arguments for ``serving.server.build_server``."""
        return {
            "port": self.port,
            "host": self.host,
            "max_message_bytes": self.max_message_mb * MIB,
            "reflection_enabled": self.reflection,
            "grace_s": self.grace_s,
            "server_credentials": tls_server_settings(self.tls_cert, self.tls_key,
                                                      self.tls_client_ca),
            "max_concurrent_rpcs": self.max_concurrent_rpcs,
            "health_port": self.health_port,
            "http_port": self.http_port,
            "http_cors_origins": tuple(
                origin.strip() for origin in self.http_cors_origins.split(",") if origin.strip()),
        }
