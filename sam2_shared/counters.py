"""``Counters``: a dataclass base for plain thread-safe integer counters that other code reads
(the metrics layer at scrape time, tests), kept by the module that counts."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Counters:
    """Subclass with ``int`` fields; ``add(name=n, ...)`` increments them atomically."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)
