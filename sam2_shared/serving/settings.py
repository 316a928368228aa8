"""One way to define a tier's settings: flags and environment variables with the same names.

A tier declares a frozen dataclass whose fields are made with ``setting(...)``::

    @dataclass(frozen=True)
    class EncoderSettings:
        model: str = setting("sam2.1/hiera_tiny", "official model id")
        store: str = setting("diskcache:///tmp/x", "embedding store URL", secret=True)
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
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sam2_shared.store.base import mask_url

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


def settings_from_values(cls: type[SettingsT], **values: Any) -> SettingsT:
    """Build ``cls`` in code (tests, embedding a tier), with the same field checks."""
    by_name = {f.name: f for f, _, _ in _fields(cls)}
    for name, value in values.items():
        if name not in by_name:
            raise TypeError(f"{cls.__name__} has no setting {name!r}")
        _check_field(by_name[name], value)
    return cls(**values)


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
