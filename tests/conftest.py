"""Session-wide fixtures: random official-format checkpoints and the parity report.

Fixtures for any test:
    random_checkpoint(model_id, seed=DEFAULT_SEED) -> Path   (factory, cached on disk)
    tiny_checkpoint -> Path                                  (sam2.1/hiera_tiny)
    synthetic_image(height, width, seed=0) -> HxWx3 uint8    (factory)

Parity tests record their worst figures in ``PARITY_STATS``; at the end of the session
they are printed as a table and written to ``tests/.parity_report.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.checkpoints import DEFAULT_SEED, make_random_checkpoint
from tests.helpers.parity_stats import PARITY_STATS, ParityStats
from tests.helpers.scratch import use_scratch_tempdir
from tests.helpers.synthetic_images import synthetic_rgb

PARITY_REPORT_PATH = Path(__file__).parent / ".parity_report.json"
_SCRATCH_ROOT_KEY = pytest.StashKey[Path]()
_RUN_FAILED_KEY = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    """Everything this session makes with ``tempfile`` goes in one folder, removed when the
    session passes (kept for a look when it fails)."""
    config.stash[_SCRATCH_ROOT_KEY] = use_scratch_tempdir("sam2-tests-")


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_SCRATCH_ROOT_KEY, None)
    if root is None:
        return
    if config.stash.get(_RUN_FAILED_KEY, False):
        print(f"\nscratch files of this failed run are kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def parity_stats() -> ParityStats:
    return PARITY_STATS


@pytest.fixture(scope="session")
def random_checkpoint() -> Callable[..., Path]:
    """Factory: path of a random official-format checkpoint for an official model id."""
    made: dict[tuple[str, int], Path] = {}

    def make(model_id: str, seed: int = DEFAULT_SEED) -> Path:
        key = (model_id, seed)
        if key not in made:
            made[key] = make_random_checkpoint(model_id, seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("sam2.1/hiera_tiny")


@pytest.fixture(scope="session")
def synthetic_image() -> Callable[..., np.ndarray]:
    """Factory: deterministic structured HxWx3 uint8 RGB test image."""
    return synthetic_rgb


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/parity/" in report.nodeid.replace("\\", "/") or report.nodeid.startswith("parity/"):
        PARITY_STATS.parity_seconds += report.duration


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_RUN_FAILED_KEY] = exitstatus not in (0, 5)  # 5: nothing collected
    if PARITY_STATS.models:
        PARITY_REPORT_PATH.write_text(json.dumps(PARITY_STATS.as_dict(), indent=2) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not PARITY_STATS.models:
        return
    columns = [
        ("model", 22),
        ("cases", 6),
        ("embed", 10),
        ("high_res", 10),
        ("logits", 10),
        ("scores", 10),
        ("min IoU", 9),
        ("|ref| at flips", 14),
    ]
    metrics = [
        "image_embed_max_abs",
        "high_res_feats_max_abs",
        "low_res_logits_max_abs",
        "scores_max_abs",
        "mask_iou_min",
        "mismatch_ref_logit_max_abs",
    ]
    write = terminalreporter.write_line
    terminalreporter.section("SAM 2 image parity vs reference (fp32 CPU, worst case)")
    write(" ".join(name.ljust(width) for name, width in columns))
    for model_id, row in sorted(PARITY_STATS.models.items()):
        cells = [model_id.ljust(22), str(PARITY_STATS.cases.get(model_id, 0)).ljust(6)]
        for metric, (_, width) in zip(metrics, columns[2:], strict=True):
            value = row.get(metric)
            text = "-" if value is None else (f"{value:.6f}" if "iou" in metric else f"{value:.2e}")
            cells.append(text.ljust(width))
        write(" ".join(cells))
    write(
        "bars: logits <= 1e-3, scores <= 1e-4, mask IoU >= 0.999; "
        f"parity tests took {PARITY_STATS.parity_seconds:.0f} s; report: {PARITY_REPORT_PATH}"
    )
