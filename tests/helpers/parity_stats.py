"""Worst parity figures per model id, collected by the parity tests during a session.

tests/conftest.py prints them at the end of the session and writes them to
``tests/.parity_report.json``.
"""

from __future__ import annotations

import math
import threading
import time


class ParityStats:
    """Worst parity figures per model id, across all cases of a session."""

    # metric -> True when larger is worse (max-abs differences), False for IoU-like figures.
    LARGER_IS_WORSE = {
        "image_embed_max_abs": True,
        "high_res_feats_max_abs": True,
        "low_res_logits_max_abs": True,
        "scores_max_abs": True,
        "mask_iou_min": False,
        "mismatch_ref_logit_max_abs": True,
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.models: dict[str, dict[str, float]] = {}
        self.cases: dict[str, int] = {}
        self.parity_seconds = 0.0

    def record(self, model_id: str, metric: str, value: float) -> None:
        if metric not in self.LARGER_IS_WORSE:
            raise KeyError(f"unknown parity metric {metric!r}")
        value = float(value)
        with self._lock:
            row = self.models.setdefault(model_id, {})
            old = row.get(metric)
            if old is None or math.isnan(value):
                row[metric] = value
            elif self.LARGER_IS_WORSE[metric]:
                row[metric] = max(old, value)
            else:
                row[metric] = min(old, value)

    def count_case(self, model_id: str) -> None:
        with self._lock:
            self.cases[model_id] = self.cases.get(model_id, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {
            "models": {
                model_id: {**row, "cases": self.cases.get(model_id, 0)}
                for model_id, row in sorted(self.models.items())
            },
            "parity_seconds": round(self.parity_seconds, 1),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


PARITY_STATS = ParityStats()
