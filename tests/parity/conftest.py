"""One reference model and one of ours per model id, shared by every parity test of a module.

``parity_pairs(model_id)`` holds one pair at a time and the collection hook runs the tests
of one model id back to back, so each model is built once per session and each image is
encoded once per model on each side (``ParityPair.encoded``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.parity.support import IMAGES_FOR_MODEL, PairCache


@pytest.fixture(scope="session")
def parity_pairs(random_checkpoint: Callable[..., Path]) -> Iterator[PairCache]:
    """Factory: the (ours, reference) pair of a model id, built once while tests use it.

    pytest's own caching of parametrised module-scoped fixtures keys on the parameter's
    index in each parametrize list and rebuilt the models for every test; this does not.
    """
    yield PairCache(random_checkpoint)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run all tests of one model id back to back (stable within a model).

    ``parity_pairs`` keeps one model pair at a time, so this order builds each model (and
    encodes each image) once.
    """
    slots = [i for i, item in enumerate(items) if _pair_model(item) is not None]
    order = {model_id: rank for rank, model_id in enumerate(IMAGES_FOR_MODEL)}
    grouped = sorted((items[i] for i in slots), key=lambda item: order[_pair_model(item)])
    for slot, item in zip(slots, grouped, strict=True):
        items[slot] = item


def _pair_model(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get("model_id")
