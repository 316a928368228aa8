"""MicroBatcher: grouping, max wait, coalescing, back-pressure, per-item errors,
cancellation, draining, and several batches at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sam2_shared.errors import InvalidInputError, NotReadyError, ResourceExhaustedError
from sam2_shared.serving.batching import BatchRecord, MicroBatcher


class Recorder:
    """A sync batch function that records its batches and can be held back."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: list[int]) -> list[object]:
        self.threads.add(threading.current_thread().name)
        self.release.wait(5)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batches.append(list(items))
        return [InvalidInputError(f"bad {i}") if i < 0 else i * 10 for i in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_concurrent_submits_are_grouped_up_to_max_batch_size() -> None:
    recorder = Recorder()

    async def main() -> list[int]:
        batcher = MicroBatcher(recorder, max_batch_size=4, max_wait_s=0.2, max_queue=64)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.close()
        assert batcher.stats.batches == len(recorder.batches)
        assert batcher.stats.items_processed == 10
        return results

    assert run(main()) == [i * 10 for i in range(10)]
    assert [len(b) for b in recorder.batches] == [4, 4, 2]
    assert sorted(i for b in recorder.batches for i in b) == list(range(10))
    # Ran on the batcher's worker thread, not on the event loop's.
    assert recorder.threads and all(name.startswith("batcher") for name in recorder.threads)


def test_a_lone_item_waits_at_most_max_wait() -> None:
    recorder = Recorder()

    async def main() -> float:
        batcher = MicroBatcher(recorder, max_batch_size=8, max_wait_s=0.05)
        started = time.monotonic()
        assert await batcher.submit(3) == 30
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    elapsed = run(main())
    assert 0.04 <= elapsed < 1.0
    assert recorder.batches == [[3]]


def test_full_batch_does_not_wait_for_the_deadline() -> None:
    recorder = Recorder()

    async def main() -> float:
        batcher = MicroBatcher(recorder, max_batch_size=2, max_wait_s=5.0)
        started = time.monotonic()
        await asyncio.gather(batcher.submit(1), batcher.submit(2))
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    assert run(main()) < 1.0
    assert recorder.batches == [[1, 2]]


def test_identical_keys_are_computed_once() -> None:
    recorder = Recorder(delay_s=0.05)

    async def main() -> None:
        batcher = MicroBatcher(recorder, max_batch_size=4, max_wait_s=0.02)
        first = asyncio.create_task(batcher.submit(7, key="same"))
        await asyncio.sleep(0.03)  # the first is now running: a late twin still coalesces
        results = await asyncio.gather(
            first, batcher.submit(7, key="same"), batcher.submit(7, key="same"),
            batcher.submit(8, key="other"),
        )
        assert results == [70, 70, 70, 80]
        assert batcher.stats.coalesced == 2
        # Once done, the same key is computed again (it is no longer in flight).
        assert await batcher.submit(7, key="same") == 70
        await batcher.close()

    run(main())
    assert sorted(i for b in recorder.batches for i in b) == [7, 7, 8]


def test_queue_full_is_rejected_at_once_with_a_retry_hint() -> None:
    recorder = Recorder()
    recorder.release.clear()  # hold the first batch on the worker

    async def main() -> None:
        batcher = MicroBatcher(recorder, max_batch_size=1, max_wait_s=0.0, max_queue=2)
        running = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)
        assert batcher.running_batch_size == 1
        queued = [asyncio.create_task(batcher.submit(2)),
                  asyncio.create_task(batcher.submit(3, key="three"))]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        started = time.monotonic()
        with pytest.raises(ResourceExhaustedError) as info:
            await batcher.submit(4)
        assert time.monotonic() - started < 0.1
        assert info.value.reason == "QUEUE_FULL"
        assert float(info.value.metadata["retry_delay_s"]) > 0
        assert batcher.stats.rejected == 1
        # A twin of a queued item needs no room: it joins instead of being rejected.
        twin = asyncio.create_task(batcher.submit(3, key="three"))
        await asyncio.sleep(0.01)
        assert batcher.stats.rejected == 1 and batcher.stats.coalesced == 1
        recorder.release.set()
        assert await running == 10
        assert [await q for q in queued] == [20, 30]
        assert await twin == 30
        await batcher.close()

    run(main())


def test_per_item_errors_fail_only_their_item() -> None:
    recorder = Recorder()

    async def main() -> list[object]:
        batcher = MicroBatcher(recorder, max_batch_size=4, max_wait_s=0.05)
        results = await asyncio.gather(
            batcher.submit(1), batcher.submit(-1), batcher.submit(2), return_exceptions=True
        )
        assert batcher.stats.items_failed == 1
        await batcher.close()
        return results

    first, bad, second = run(main())
    assert (first, second) == (10, 20)
    assert isinstance(bad, InvalidInputError) and "bad -1" in str(bad)
    assert len(recorder.batches) == 1


def test_a_raising_batch_fails_its_items_and_the_next_batch_still_runs() -> None:
    calls: list[list[int]] = []

    def flaky(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return [i + 1 for i in items]

    async def main() -> None:
        batcher = MicroBatcher(flaky, max_batch_size=2, max_wait_s=0.05)
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await batcher.submit(3) == 4
        await batcher.close()

    run(main())


def test_wrong_result_count_fails_the_batch() -> None:
    async def main() -> None:
        batcher = MicroBatcher(lambda items: [1], max_batch_size=2, max_wait_s=0.05)
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "2 items" in str(r) for r in results)
        await batcher.close()

    run(main())


def test_cancelled_caller_does_not_disturb_others() -> None:
    recorder = Recorder()

    async def main() -> None:
        batcher = MicroBatcher(recorder, max_batch_size=8, max_wait_s=0.1)
        lone = asyncio.create_task(batcher.submit(1))
        shared_a = asyncio.create_task(batcher.submit(2, key="two"))
        shared_b = asyncio.create_task(batcher.submit(2, key="two"))
        other = asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0.01)
        lone.cancel()
        shared_a.cancel()
        assert await shared_b == 20  # its twin gave up; it still gets the result
        assert await other == 30
        with pytest.raises(asyncio.CancelledError):
            await lone
        assert batcher.stats.cancelled == 1
        await batcher.close()

    run(main())
    assert recorder.batches == [[2, 3]]  # the abandoned item never ran


def test_close_drains_queued_items_and_refuses_new_ones() -> None:
    recorder = Recorder(delay_s=0.02)

    async def main() -> None:
        batcher = MicroBatcher(recorder, max_batch_size=2, max_wait_s=1.0)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
        await asyncio.sleep(0.01)
        await batcher.close()
        assert [t.result() for t in tasks] == [0, 10, 20, 30, 40]
        with pytest.raises(NotReadyError) as info:
            await batcher.submit(9)
        assert info.value.reason == "SHUTTING_DOWN"
        await batcher.close()  # idempotent

    run(main())
    assert sum(len(b) for b in recorder.batches) == 5


def test_close_timeout_fails_what_is_left() -> None:
    recorder = Recorder()
    recorder.release.clear()

    async def main() -> None:
        batcher = MicroBatcher(recorder, max_batch_size=1, max_wait_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(2)]
        await asyncio.sleep(0.02)
        await batcher.close(timeout_s=0.05)
        for task in tasks:
            with pytest.raises(NotReadyError):
                await task
        recorder.release.set()

    run(main())


def test_async_batch_function_and_observers() -> None:
    records: list[BatchRecord] = []

    async def double(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        return [2 * i for i in items]

    async def main() -> None:
        batcher = MicroBatcher(double, max_batch_size=3, max_wait_s=0.02)
        batcher.stats.observers.append(records.append)
        assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 2, 4]
        await batcher.close()

    run(main())
    assert len(records) == 1 and records[0].size == 3
    assert records[0].run_s >= 0.009 and all(w >= 0 for w in records[0].queue_wait_s)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch_size=0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_queue=0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, workers=0)


class Concurrent:
    """A sync batch function that records which batches were inside it at the same time;
    ``hold`` keeps every call inside until set."""

    def __init__(self) -> None:
        self.started: list[list[int]] = []
        self.threads: set[str] = set()
        self.most_at_once = 0
        self._inside = 0
        self._lock = threading.Lock()
        self.hold = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self.started.append(list(items))
            self.threads.add(threading.current_thread().name)
            self._inside += 1
            self.most_at_once = max(self.most_at_once, self._inside)
        self.hold.wait(5)
        with self._lock:
            self._inside -= 1
        return [i * 10 for i in items]


def test_workers_run_batches_at_once_and_share_out_the_queue() -> None:
    function = Concurrent()

    async def main() -> list[int]:
        batcher = MicroBatcher(function, max_batch_size=8, max_wait_s=0.5, workers=2)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(8)]
        while len(function.started) < 2:  # both batches inside the function at once
            await asyncio.sleep(0.005)
        assert batcher.running_batch_size == 8 and batcher.queue_depth == 0
        function.hold.set()
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return results

    assert run(main()) == [i * 10 for i in range(8)]
    assert function.started == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 8 queued, 2 free workers
    assert function.most_at_once == 2 and len(function.threads) == 2


def test_a_lone_item_starts_on_a_free_worker_beside_a_running_batch() -> None:
    function = Concurrent()

    async def main() -> list[int]:
        batcher = MicroBatcher(function, max_batch_size=8, max_wait_s=0.0, workers=2)
        first = asyncio.create_task(batcher.submit(0))
        while not function.started:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(batcher.submit(1))  # one item, the first still running
        deadline = time.monotonic() + 2  # the first batch is held for 5 s
        while len(function.started) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert function.started == [[0], [1]], "a lone item waited for the running batch"
        assert batcher.queue_depth == 0
        third = asyncio.create_task(batcher.submit(2))  # both workers busy: it waits
        await asyncio.sleep(0.05)
        assert len(function.started) == 2 and batcher.queue_depth == 1
        function.hold.set()
        results = await asyncio.gather(first, second, third)
        await batcher.close()
        return results

    assert run(main()) == [0, 10, 20]
    assert function.started == [[0], [1], [2]] and function.most_at_once == 2


def test_close_with_workers_drains_every_running_batch() -> None:
    recorder = Recorder(delay_s=0.05)

    async def main() -> None:
        batcher = MicroBatcher(recorder, max_batch_size=2, max_wait_s=0.0, workers=3)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(7)]
        await asyncio.sleep(0.01)
        await batcher.close()
        assert [t.result() for t in tasks] == [i * 10 for i in range(7)]

    run(main())
    assert sorted(i for b in recorder.batches for i in b) == list(range(7))
    assert len(recorder.threads) > 1


def test_close_timeout_with_workers_fails_every_unfinished_item() -> None:
    function = Concurrent()  # never lets a batch finish before the timeout

    async def main() -> None:
        batcher = MicroBatcher(function, max_batch_size=1, max_wait_s=0.0, workers=2)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
        while batcher.queue_depth != 3:  # two batches taken, their tasks not yet run
            await asyncio.sleep(0)
        await batcher.close(timeout_s=0)
        for task in tasks:
            with pytest.raises(NotReadyError):
                await asyncio.wait_for(task, 1)
        function.hold.set()

    run(main())


def test_free_workers_share_the_queue_by_weight() -> None:
    function = Concurrent()

    async def main() -> None:
        batcher = MicroBatcher(function, max_batch_size=8, max_wait_s=0.5, workers=2,
                               weight=lambda item: item)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (16, 15, 1, 2)]
        while len(function.started) < 2:
            await asyncio.sleep(0.005)
        function.hold.set()
        await asyncio.gather(*tasks)
        await batcher.close()

    run(main())
    assert function.started == [[16], [15, 1, 2]]  # weights 16 and 18, not 31 and 3
