"""An asyncio dynamic micro-batcher, shared by the encoder and decoder tiers.

Concurrent ``submit`` calls are grouped into one call of the batch function, up to
``max_batch_size`` items or until the oldest queued item has waited ``max_wait_s``. Batches
run on dedicated worker threads, so the event loop keeps serving RPCs while the model works;
items that arrive meanwhile form the next batch. At most ``workers`` batches run at once
(default one); a free worker starts on whatever is queued, even one item, and when several
workers are free, the queued items are shared out among them by weight.

- Coalescing: submits with the same non-None ``key`` while an earlier one is queued or
  running share its result; the item is computed once.
- Back-pressure: at most ``max_queue`` distinct items wait; beyond that ``submit`` raises
  ``ResourceExhaustedError`` (reason ``QUEUE_FULL``, metadata ``retry_delay_s``) at once.
- Failures: the batch function returns one result per item, in order, where a result may
  be an ``Exception`` that fails only its item; if the function raises, every item of that
  batch fails with that exception, and later batches are unaffected.
- Cancellation: a cancelled caller stops waiting; its item is dropped if nobody else
  waits for it and it has not started, and never disturbs the other callers.
- ``close()`` refuses new items, runs everything already queued, then stops the worker.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sam2_shared.errors import NotReadyError, ResourceExhaustedError

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# list[item] -> results (or an awaitable of them), one per item, each maybe an exception.
BatchFunction = Callable[[list[Any]], "Sequence[Any] | Awaitable[Sequence[Any]]"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRecord:
    """One executed batch, as handed to ``BatcherStats`` observers."""

    size: int
    queue_wait_s: tuple[float, ...]  # per item: from submit to the batch starting
    run_s: float
    failed_items: int


@dataclass
class BatcherStats:
    """Counters of one ``MicroBatcher``; a metrics layer reads them or adds an observer.

    ``submitted`` counts every ``submit``; ``coalesced`` those that joined an identical
    in-flight item; ``rejected`` those refused because the queue was full; ``cancelled``
    queued items dropped because every caller gave up.
    """

    submitted: int = 0
    coalesced: int = 0
    rejected: int = 0
    cancelled: int = 0
    batches: int = 0
    items_processed: int = 0
    items_failed: int = 0
    last_batch_size: int = 0
    max_batch_size_seen: int = 0
    queue_wait_seconds_total: float = 0.0
    run_seconds_total: float = 0.0
    observers: list[Callable[[BatchRecord], None]] = field(default_factory=list, repr=False)

    @property
    def mean_batch_size(self) -> float:
        return self.items_processed / self.batches if self.batches else 0.0

    def record(self, batch: BatchRecord) -> None:
        self.batches += 1
        self.items_processed += batch.size
        self.items_failed += batch.failed_items
        self.last_batch_size = batch.size
        self.max_batch_size_seen = max(self.max_batch_size_seen, batch.size)
        self.queue_wait_seconds_total += sum(batch.queue_wait_s)
        self.run_seconds_total += batch.run_s
        for observer in self.observers:
            try:
                observer(batch)
            except Exception:  # a broken metrics hook must not fail requests
                logger.exception("batch observer failed")


class _Entry(Generic[ItemT]):
    """One distinct queued or running item and everyone waiting for it."""

    __slots__ = ("item", "key", "future", "enqueued_at", "waiters", "started")

    def __init__(self, item: ItemT, key: Hashable | None, future: asyncio.Future) -> None:
        self.item = item
        self.key = key
        self.future = future
        self.enqueued_at = time.monotonic()
        self.waiters = 1
        self.started = False


class MicroBatcher(Generic[ItemT, ResultT]):
    """Groups concurrent items into batched calls of ``process_batch``.

    Arguments:
        process_batch: ``list[item] -> list[result | Exception]`` (same length and order).
            A plain function runs on the batcher's worker thread; a coroutine function is
            awaited on the event loop (it must not block).
        max_batch_size: most items per call.
        max_wait_s: longest time the oldest queued item waits for the batch to fill.
        max_queue: most distinct items waiting (not counting the running batches).
        name: for logs, errors and the worker threads' names.
        retry_delay_s: retry hint put on ``QUEUE_FULL`` errors.
        workers: most batches running at once, each on a worker thread of its own (a plain
            ``process_batch`` must then be safe to call from several threads at once).
        weight: an item's weight (default 1 each), e.g. the work it carries.

    Create and use it inside one running event loop.
    """

    def __init__(
        self,
        process_batch: BatchFunction,
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        name: str = "batcher",
        retry_delay_s: float = 0.5,
        workers: int = 1,
        weight: Callable[[Any], int] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._process_batch = process_batch
        self._is_async = inspect.iscoroutinefunction(process_batch)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.name = name
        self.retry_delay_s = retry_delay_s
        self.workers = workers
        self._weight = weight
        self.stats = BatcherStats()
        self._queue: collections.deque[_Entry[ItemT]] = collections.deque()
        self._by_key: dict[Hashable, _Entry[ItemT]] = {}
        self._running: list[list[_Entry[ItemT]]] = []  # the batches running now
        self._batches: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    # ------------------------------------------------------------------ inspection

    @property
    def queue_depth(self) -> int:
        """Distinct items waiting for a batch (not counting the running ones)."""
        return len(self._queue)

    @property
    def running_batch_size(self) -> int:
        """Items in the batches running now."""
        return sum(len(batch) for batch in self._running)

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------ submitting

    async def submit(self, item: ItemT, key: Hashable | None = None) -> ResultT:
        """Queue ``item`` and return its result (or raise its exception).

        Raises:
            ResourceExhaustedError: the queue is full (reason ``QUEUE_FULL``).
            NotReadyError: the batcher is closing (reason ``SHUTTING_DOWN``).
        """
        if self._closing:
            raise NotReadyError(
                f"{self.name} is shutting down; retry on another replica",
                reason="SHUTTING_DOWN",
            )
        self._start_worker()
        self.stats.submitted += 1
        entry = self._by_key.get(key) if key is not None else None
        if entry is not None:
            entry.waiters += 1
            self.stats.coalesced += 1
        else:
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise ResourceExhaustedError(
                    f"{self.name} queue is full ({self.max_queue} items waiting); "
                    f"retry in {self.retry_delay_s:g} s or on another replica",
                    reason="QUEUE_FULL",
                    retry_delay_s=f"{self.retry_delay_s:g}",
                    queue_size=str(self.max_queue),
                )
            entry = _Entry(item, key, asyncio.get_running_loop().create_future())
            self._queue.append(entry)
            if key is not None:
                self._by_key[key] = entry
            assert self._wakeup is not None
            self._wakeup.set()
        try:
            # shield: one caller's cancellation must not cancel the shared future.
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            self._abandon(entry)
            raise

    def _abandon(self, entry: _Entry[ItemT]) -> None:
        entry.waiters -= 1
        if entry.waiters > 0 or entry.started or entry.future.done():
            return
        try:
            self._queue.remove(entry)
        except ValueError:
            return
        self._forget(entry)
        entry.future.cancel()
        self.stats.cancelled += 1

    def _forget(self, entry: _Entry[ItemT]) -> None:
        if entry.key is not None and self._by_key.get(entry.key) is entry:
            del self._by_key[entry.key]

    # ------------------------------------------------------------------ the worker

    def _start_worker(self) -> None:
        if self._worker is not None:
            return
        self._wakeup = asyncio.Event()
        if not self._is_async:
            self._executor = ThreadPoolExecutor(max_workers=self.workers,
                                                thread_name_prefix=self.name)
        self._worker = asyncio.get_running_loop().create_task(
            self._run(), name=f"{self.name}-worker"
        )

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._queue or len(self._batches) >= self.workers:
                if self._closing and not self._queue and not self._batches:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for the batch to fill, but never past the oldest item's deadline.
            deadline = self._queue[0].enqueued_at + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._closing and self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            if not self._queue:  # every waiting caller was cancelled meanwhile
                continue
            # Shared out among the free workers by weight: items of 16, 16, 1, 1 with 2
            # workers free go as [16] and [16, 1, 1].
            queued = self._queued_weight()
            parts = min(self.workers - len(self._batches), max(1, queued))
            share = -(-queued // parts)
            batch: list[_Entry[ItemT]] = []
            weight = 0
            while self._queue and len(batch) < self.max_batch_size:
                next_weight = self._item_weight(self._queue[0])
                if batch and weight + next_weight > share:
                    break
                batch.append(self._queue.popleft())
                weight += next_weight
            # Started from here on: a close() that times out before the batch's task runs
            # still finds (and fails) its items in _running.
            for entry in batch:
                entry.started = True
            self._running.append(batch)
            if self.workers == 1:
                await self._execute(batch)
                continue
            task = asyncio.get_running_loop().create_task(
                self._execute(batch), name=f"{self.name}-batch")
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _item_weight(self, entry: _Entry[ItemT]) -> int:
        return 1 if self._weight is None else self._weight(entry.item)

    def _queued_weight(self) -> int:
        return sum(self._item_weight(entry) for entry in self._queue)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if self._wakeup is not None:
            self._wakeup.set()

    async def _execute(self, batch: list[_Entry[ItemT]]) -> None:
        started = time.monotonic()
        items = [entry.item for entry in batch]
        try:
            if self._is_async:
                results: Any = await self._process_batch(items)  # type: ignore[misc]
            else:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(self._executor, self._process_batch, items)
            results = list(results)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: batch function returned {len(results)} results "
                    f"for {len(batch)} items"
                )
        except Exception as exc:
            logger.debug("%s: batch of %d failed: %r", self.name, len(batch), exc)
            results = [exc] * len(batch)
        finally:
            self._running.remove(batch)
        failed = 0
        for entry, result in zip(batch, results):
            self._forget(entry)
            if entry.future.done():
                continue
            if isinstance(result, BaseException):
                failed += 1
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)
        self.stats.record(
            BatchRecord(
                size=len(batch),
                queue_wait_s=tuple(started - entry.enqueued_at for entry in batch),
                run_s=time.monotonic() - started,
                failed_items=failed,
            )
        )

    # ------------------------------------------------------------------ shutdown

    async def close(self, timeout_s: float | None = None) -> None:
        """Refuse new items, finish the queued and running ones, stop the worker.

        With ``timeout_s``, items still unfinished after it fail with ``NotReadyError``.
        Safe to call more than once.
        """
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        worker = self._worker
        if worker is not None and not worker.done():
            try:
                await asyncio.wait_for(asyncio.shield(worker), timeout_s)
            except asyncio.TimeoutError:
                worker.cancel()
                for task in list(self._batches):
                    task.cancel()
                leftovers = list(self._queue) + [e for batch in self._running for e in batch]
                self._queue.clear()
                for entry in leftovers:
                    self._forget(entry)
                    if not entry.future.done():
                        entry.future.set_exception(
                            NotReadyError(f"{self.name} shut down before this item ran",
                                          reason="SHUTTING_DOWN")
                        )
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
