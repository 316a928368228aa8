"""Every ``__init__`` of a class in ``sam2_shared/model/*.py`` documents its arguments.

The docstring must hold an ``Arguments:`` block (the style of Meta's segment-anything code)
with one entry, written ``name (type): description``, for every argument except ``self``
(``*args`` / ``**kwargs`` may keep their stars), listed in signature order. The sources are
read with ``ast`` only; nothing is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO_ROOT

MODEL_DIR = REPO_ROOT / "sam2_shared" / "model"


def _init_argument_names(init: ast.FunctionDef) -> list[str]:
    args = init.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    if args.vararg is not None:
        names.append(args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg is not None:
        names.append(args.kwarg.arg)
    return [name for name in names if name != "self"]


def init_docstring_problems(source: str, filename: str = "<source>") -> list[str]:
    """Problems with the ``__init__`` docstrings of the classes in ``source`` (none: [])."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.ClassDef):
            continue
        for init in node.body:
            if not (isinstance(init, ast.FunctionDef) and init.name == "__init__"):
                continue
            where = f"{filename}:{node.name}.__init__"
            doc = ast.get_docstring(init)
            if not doc or "Arguments:" not in doc:
                problems.append(f"{where}: no 'Arguments:' block in the docstring")
                continue
            block = doc.split("Arguments:", 1)[1]
            positions = []
            for name in _init_argument_names(init):
                entry = re.search(rf"^\s*\**{re.escape(name)} \(", block, re.MULTILINE)
                if entry is None:
                    problems.append(f"{where}: argument {name!r} is not documented")
                else:
                    positions.append(entry.start())
            if positions != sorted(positions):
                problems.append(f"{where}: arguments are not in signature order")
    return problems


def _model_sources() -> list[Path]:
    return sorted(MODEL_DIR.glob("*.py"))


def test_every_model_init_documents_its_arguments() -> None:
    sources = _model_sources()
    assert sources, f"no model sources under {MODEL_DIR}"
    problems = []
    checked = 0
    for path in sources:
        source = path.read_text(encoding="utf-8")
        checked += source.count("def __init__(")
        problems += init_docstring_problems(source, path.name)
    assert checked > 0, "found no __init__ to check"
    assert not problems, "\n".join(problems)


_SYNTHETIC = '''
class Documented:
    def __init__(self, dim: int, num_heads: int, **kwargs: int) -> None:
        """
        Arguments:
          dim (int): channels of the input.
          num_heads (int): number of attention heads.
          **kwargs (int): further options.
        """


class MissingOne:
    def __init__(self, dim: int, num_heads: int) -> None:
        """
        Arguments:
          dim (int): channels of the input.
        """


class NoBlock:
    def __init__(self, dim: int) -> None:
        """Channels of the input: dim."""


class OutOfOrder:
    def __init__(self, dim: int, num_heads: int) -> None:
        """
        Arguments:
          num_heads (int): number of attention heads.
          dim (int): channels of the input.
        """
'''


def test_check_reports_undocumented_arguments() -> None:
    problems = init_docstring_problems(_SYNTHETIC)
    assert problems == [
        "<source>:MissingOne.__init__: argument 'num_heads' is not documented",
        "<source>:NoBlock.__init__: no 'Arguments:' block in the docstring",
        "<source>:OutOfOrder.__init__: arguments are not in signature order",
    ]
