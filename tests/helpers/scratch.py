"""One scratch folder per test session or benchmark run, removed at its end.

The diskcache stores, spools and tier work folders that tests and benchmarks make are up to
~300 MB each; left in /tmp, every full run leaked gigabytes until the disk filled.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def use_scratch_tempdir(prefix: str, remove_at_exit: bool = False) -> Path:
    """Make a folder and point ``tempfile`` and ``TMPDIR`` (which the tier processes inherit)
    at it, so that everything made with ``tempfile`` from now on lands inside; returns it.

    Arguments:
        prefix (str): the folder's name starts with it.
        remove_at_exit (bool): remove it when the interpreter exits (benchmarks: normal end,
            error or Ctrl-C); the test session removes its own in ``pytest_unconfigure``.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    tempfile.tempdir = str(root)
    os.environ["TMPDIR"] = str(root)
    if remove_at_exit:
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root
