"""TensorMemo: values kept for the same tensor objects, unmodified, the most recently used."""

from __future__ import annotations

import torch

from sam2_shared.model.common import TensorMemo


def test_hits_need_the_same_unmodified_tensors_and_the_least_recently_used_goes() -> None:
    memo: TensorMemo[str] = TensorMemo(2)
    a, b, c = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    made: list[str] = []

    def get(name: str, *sources: torch.Tensor) -> str:
        return memo.get(sources, lambda: made.append(name) or name)

    assert get("a", a) == "a" and get("b", b) == "b"
    assert get("a", a) == "a" and made == ["a", "b"]  # a hit, and now the most recent
    assert get("equal values, other tensor", a.clone()) == "equal values, other tensor"
    assert len(memo) == 2 and made[-1] == "equal values, other tensor"
    assert get("a", a) == "a" and made.count("a") == 1  # b went, not a
    assert get("b again", b) == "b again"
    a.add_(1.0)  # written in place: its version moved
    assert get("a changed", a) == "a changed"
    assert get("two sources", a, c) == "two sources" and get("x", a, c) == "two sources"
    assert get("order matters", c, a) == "order matters"
    with torch.inference_mode():
        frozen = torch.zeros(3)  # no version counter: identity alone
    assert get("frozen", frozen) == "frozen" and get("y", frozen) == "frozen"
