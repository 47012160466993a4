"""The batcher on its own, with a plain function standing in for the model."""

import asyncio
import gc
import threading
import time
import weakref

import pytest

from service.batching import (
    Batcher,
    BatcherClosedError,
    QueueFullError,
    RequestTimeoutError,
)


class Recorder:
    """Doubles each payload and records the batches it was called with."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, payloads: list[int]) -> list[int]:
        self.batches.append(list(payloads))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_on in payloads:
            raise ValueError(f"cannot process {self.fail_on}")
        return [2 * payload for payload in payloads]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=30))


def test_concurrent_requests_share_batch():
    recorder = Recorder()

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=4, max_wait_s=0.5, max_queue_size=8)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i, 10) for i in range(4)))
        await batcher.stop(5)
        return results

    results = run(scenario())
    assert [value for value, _ in results] == [0, 2, 4, 6]
    assert recorder.batches == [[0, 1, 2, 3]]
    assert all(timing.batch_size == 4 for _, timing in results)
    assert recorder.threads and all(
        name.startswith("adamtl-inference") for name in recorder.threads
    )


def test_full_batch_starts_without_waiting():
    recorder = Recorder()

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=2, max_wait_s=10.0, max_queue_size=2)
        batcher.start()
        started = time.perf_counter()
        await asyncio.gather(batcher.submit(1, 10), batcher.submit(2, 10))
        elapsed = time.perf_counter() - started
        await batcher.stop(5)
        return elapsed

    assert run(scenario()) < 2.0


def test_batches_capped_at_max_size():
    recorder = Recorder(delay_s=0.05)

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=3, max_wait_s=0.05, max_queue_size=16)
        batcher.start()
        await asyncio.gather(*(batcher.submit(i, 10) for i in range(7)))
        await batcher.stop(5)

    run(scenario())
    assert max(len(batch) for batch in recorder.batches) == 3
    assert sorted(p for batch in recorder.batches for p in batch) == list(range(7))


def test_event_loop_not_blocked_during_inference():
    recorder = Recorder(delay_s=0.3)

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=1, max_wait_s=0.0, max_queue_size=4)
        batcher.start()
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await batcher.submit(1, 10)
        ticker.cancel()
        await batcher.stop(5)
        return ticks

    assert run(scenario()) >= 10


def test_queue_full_rejects_beyond_admission_limit():
    recorder = Recorder(delay_s=0.3)

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=1, max_wait_s=0.0, max_queue_size=2)
        batcher.start()
        outcomes = await asyncio.gather(
            *(batcher.submit(i, 10) for i in range(4)), return_exceptions=True
        )
        await batcher.stop(5)
        return outcomes

    outcomes = run(scenario())
    assert sum(isinstance(o, QueueFullError) for o in outcomes) == 2
    assert sum(isinstance(o, tuple) for o in outcomes) == 2


def test_timeout_raises_and_skips_queued_job():
    recorder = Recorder(delay_s=0.3)

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=1, max_wait_s=0.0, max_queue_size=4)
        batcher.start()
        first = asyncio.create_task(batcher.submit(1, 10))
        await asyncio.sleep(0.05)
        with pytest.raises(RequestTimeoutError, match="within 0.1 s"):
            await batcher.submit(2, 0.1)
        await first
        await batcher.stop(5)
        return batcher.queue_depth

    assert run(scenario()) == 0
    assert recorder.batches == [[1]]


def test_failing_payload_fails_alone():
    recorder = Recorder(fail_on=3)

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=4, max_wait_s=0.5, max_queue_size=4)
        batcher.start()
        outcomes = await asyncio.gather(
            *(batcher.submit(i, 10) for i in range(4)), return_exceptions=True
        )
        await batcher.stop(5)
        return outcomes

    outcomes = run(scenario())
    assert isinstance(outcomes[3], ValueError)
    assert [outcome[0] for outcome in outcomes[:3]] == [0, 2, 4]


def test_stop_drains_admitted_requests():
    recorder = Recorder(delay_s=0.1)

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=1, max_wait_s=0.0, max_queue_size=4)
        batcher.start()
        pending = [asyncio.create_task(batcher.submit(i, 10)) for i in range(3)]
        await asyncio.sleep(0.01)
        await batcher.stop(5)
        with pytest.raises(BatcherClosedError):
            await batcher.submit(9, 10)
        return [task.result()[0] for task in pending]

    assert run(scenario()) == [0, 2, 4]


def test_queue_smaller_than_batch_rejected():
    with pytest.raises(ValueError, match="max_queue_size 2 must be at least max_batch_size 4"):
        Batcher(Recorder(), max_batch_size=4, max_wait_s=0.0, max_queue_size=2)


def test_stop_fails_running_batch_on_timeout():
    recorder = Recorder(delay_s=1.0)

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=2, max_wait_s=0.0, max_queue_size=4)
        batcher.start()
        running = asyncio.create_task(batcher.submit(1, 10))
        while not recorder.batches:
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        await batcher.stop(0.1)
        with pytest.raises(BatcherClosedError, match="shut down before this request finished"):
            await running
        return time.perf_counter() - started, batcher.queue_depth

    elapsed, depth = run(scenario())
    # The batch function sleeps 1 s; the request failed at the drain timeout instead.
    assert elapsed < 0.8
    assert depth == 0
    assert recorder.batches == [[1]]


def test_stop_fails_queued_behind_running_batch():
    recorder = Recorder(delay_s=1.0)

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=1, max_wait_s=0.0, max_queue_size=4)
        batcher.start()
        running = asyncio.create_task(batcher.submit(1, 10))
        while not recorder.batches:
            await asyncio.sleep(0.005)
        queued = asyncio.create_task(batcher.submit(2, 10))
        await asyncio.sleep(0.01)
        await batcher.stop(0.1)
        return await asyncio.gather(running, queued, return_exceptions=True)

    outcomes = run(scenario())
    assert isinstance(outcomes[0], BatcherClosedError)
    assert "finished" in str(outcomes[0])
    assert isinstance(outcomes[1], BatcherClosedError)
    assert "ran" in str(outcomes[1])
    assert recorder.batches == [[1]]


def test_close_rejects_new_but_runs_admitted():
    recorder = Recorder()

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=1, max_wait_s=0.0, max_queue_size=4)
        batcher.start()
        admission = batcher.admit()
        batcher.close()
        with pytest.raises(BatcherClosedError):
            batcher.admit()
        with admission:
            result, _ = await batcher.submit(5, 10, admission)
        await batcher.stop(5)
        await batcher.stop(5)  # a second stop does nothing
        return result

    assert run(scenario()) == 10


def test_admit_after_close_until_stop():
    recorder = Recorder()

    async def scenario():
        batcher = Batcher(recorder, max_batch_size=1, max_wait_s=0.0, max_queue_size=4)
        batcher.start()
        batcher.close()
        # A request that arrived before the drain may still take a slot and run.
        with batcher.admit(after_close=True) as admission:
            result, _ = await batcher.submit(7, 10, admission)
        await batcher.stop(5)
        with pytest.raises(BatcherClosedError):
            batcher.admit(after_close=True)
        return result

    assert run(scenario()) == 14


def test_payloads_released_after_batch():
    """The batcher drops a batch's payloads once it has delivered the results."""

    class Payload:
        pass

    async def scenario():
        batcher = Batcher(
            lambda payloads: [1] * len(payloads), max_batch_size=2, max_wait_s=0, max_queue_size=2
        )
        batcher.start()
        payload = Payload()
        reference = weakref.ref(payload)
        await batcher.submit(payload, 10)
        del payload
        # Let the batching loop go back to waiting for the next request.
        await asyncio.sleep(0.05)
        gc.collect()
        alive = reference() is not None
        await batcher.stop(5)
        return alive

    assert not run(scenario())
