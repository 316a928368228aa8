"""One reference model and one of ours per model id, shared by every parity test of a module.

``parity_pair`` is module-scoped and parametrised indirectly by model id, so pytest groups
the tests of one model together and holds at most one pair in memory at a time. Each image
is encoded once per model on each side (``ParityPair.encoded``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from parity_support import IMAGES_FOR_MODEL, ParityPair
from reference import ReferenceImage


@pytest.fixture(scope="module")
def parity_pair(
    request: pytest.FixtureRequest, random_checkpoint: Callable[..., Path]
) -> Iterator[ParityPair]:
    model_id: str = request.param
    checkpoint = random_checkpoint(model_id)
    from sam2_shared import Sam2Model

    torch.manual_seed(0)  # nothing should be random at inference; make any slip reproducible
    ours = Sam2Model.from_pretrained(model_id, checkpoint=str(checkpoint), device="cpu")
    reference = ReferenceImage(model_id, checkpoint)
    yield ParityPair(model_id, checkpoint, ours, reference)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run all tests of one model id back to back (stable within a model).

    pytest keys indirect module-scoped params by their index in each parametrize list, so it
    does not group them across test functions on its own; without this, every model would
    be built (and every image encoded) once per test function.
    """
    slots = [i for i, item in enumerate(items) if _pair_model(item) is not None]
    order = {model_id: rank for rank, model_id in enumerate(IMAGES_FOR_MODEL)}
    grouped = sorted((items[i] for i in slots), key=lambda item: order[_pair_model(item)])
    for slot, item in zip(slots, grouped, strict=True):
        items[slot] = item


def _pair_model(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get("parity_pair")
