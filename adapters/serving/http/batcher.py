"""The request batchers: one worker thread each that turns concurrent requests into engine work.

``ContinuousBatcher`` (the default, ``ServerSettings.batching = "continuous"``): iteration-level scheduling.
Between decode steps its worker admits waiting requests into the running batch (``InferenceEngine.start``),
steps every running row one token (``engine.scheduler.step()``), hands each token to its request
(``on_token``, for streaming) and resolves a request's Future when its last row finishes. A short request
never waits for a long one to end, and rows of different adapters share each forward pass.

``Batcher`` (``batching = "window"``): gathers requests for a time window into one engine batch
(``InferenceEngine.generate``), which runs to its end before the next starts.

Both take the same calls: ``submit(kind, rows, on_token)`` -> Future, ``cancel(future)``, ``depth()``,
``running()``, ``close()``. Classification (one short pass) runs as one engine call either way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from adapters.modeling.generation import TokenLogprobs
from adapters.serving.engine import InferenceEngine, LiveRow, generation_result

log = logging.getLogger(__name__)


# (row index in its job, the live row, token id, the row's TokenLogprobs so far when asked: the last is this token's)
TokenCallback = Callable[[int, LiveRow, int, "TokenLogprobs | None"], None]


@dataclass(eq=False)
class _Job:
    kind: Literal["generate", "classify"]
    rows: list  # GenerationRequest | ClassificationRequest
    future: Future = field(default_factory=Future)
    on_token: TokenCallback | None = None
    results: list = field(default_factory=list)  # continuous: one result per row, as rows finish
    live: list[LiveRow] = field(default_factory=list)  # continuous: the rows in the running batch


class Batcher:
    """Gathers jobs for ``window_s`` seconds (up to ``max_rows`` rows) and runs them as one engine batch.

    Args:
        engine: runs the batches (``engine.generate`` / ``engine.classify`` on a list of rows).
        window_s: seconds to wait for more jobs after the first one of a batch arrives.
        max_rows: most rows (prompts or texts) in one engine call; a job is never split across batches.
        on_batch: called with (rows, distinct adapters) after each engine call that succeeded.
        mix_adapters: let one batch hold rows for different adapters (off: one engine call per adapter).

    A single daemon thread runs the batches, so the event loop keeps accepting requests. When a mixed
    batch fails, each of its jobs is run alone, so only the bad one fails.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        window_s: float,
        max_rows: int,
        on_batch: Callable[[int, int], None] | None = None,
        mix_adapters: bool = True,
    ):
        self.engine, self.window_s, self.max_rows, self.on_batch = engine, window_s, max_rows, on_batch
        self.mix_adapters = mix_adapters
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="adapterkit-batcher", daemon=True)
        self._thread.start()

    def submit(self, kind: str, rows: list, on_token: TokenCallback | None = None) -> Future:
        """Queue ``rows`` (GenerationRequest for "generate", ClassificationRequest for "classify").

        Returns a Future of the engine's results for these rows, in order, or of the engine's exception.
        ``on_token`` is never called: a window batch hands out whole results.
        """
        job = _Job(kind, rows)  # type: ignore[arg-type]
        self._queue.put(job)
        return job.future

    def cancel(self, future: Future) -> None:
        """Forget the job of ``future`` if it has not started (a started window batch runs to its end)."""
        future.cancel()

    def depth(self) -> int:
        """Jobs waiting in the queue (not counting the batch being run)."""
        return self._queue.qsize()

    def running(self) -> int:
        """Rows decoding now: none is tracked between a window batch's steps."""
        return 0

    def close(self) -> None:
        """Stop the worker after the jobs already queued; waits up to 5 s for it."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _gather(self, job: _Job, pending: list[_Job]) -> list[_Job]:
        """``job`` and the jobs arriving within the window that fit; one that does not fit goes to ``pending``."""
        batch, rows = [job], len(job.rows)
        deadline = time.perf_counter() + self.window_s
        while rows < self.max_rows:
            remaining = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            if rows + len(nxt.rows) > self.max_rows:
                pending.append(nxt)
                break
            batch.append(nxt)
            rows += len(nxt.rows)
        return batch

    def _run(self) -> None:
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self._queue.get()
            if job is None:
                return
            groups: dict[tuple, list[_Job]] = {}
            for j in self._gather(job, pending):
                adapter = None if self.mix_adapters else j.rows[0].adapter
                groups.setdefault((j.kind, adapter), []).append(j)
            for (kind, _), jobs in groups.items():
                jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop cancelled ones
                if not jobs:
                    continue
                try:
                    self._execute(kind, jobs)
                except Exception as err:  # noqa: BLE001 - keep the worker alive whatever happens
                    log.exception("batch failed")
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(err)

    def _execute(self, kind: str, jobs: list[_Job]) -> None:
        run = self.engine.generate if kind == "generate" else self.engine.classify
        rows = [r for j in jobs for r in j.rows]
        try:
            results = run(rows)
        except Exception as err:  # noqa: BLE001 - one bad job must not fail the others
            if len(jobs) == 1:
                jobs[0].future.set_exception(err)
            else:  # find the bad one: run each job alone
                for j in jobs:
                    self._execute(kind, [j])
            return
        if self.on_batch:
            self.on_batch(len(rows), len({getattr(r, "adapter", None) for r in rows}))
        start = 0
        for j in jobs:
            j.future.set_result(results[start : start + len(j.rows)])
            start += len(j.rows)


class ContinuousBatcher:
    """Runs requests with continuous (iteration-level) batching: rows join and leave the running decode batch
    between steps (Yu et al. 2022, "Orca"; see adapters.serving.scheduler).

    Args:
        engine: decodes the rows (``engine.start`` / ``engine.scheduler``) and classifies (``engine.classify``).
        max_rows: most rows decoding at once; a request waits until its rows fit (one larger than this runs
            alone when nothing else does). A request's rows join together and are never split.
        on_batch: called with (rows, distinct adapters) after each decode step and each classification.
        mix_adapters: let rows of different adapters share the running batch (off: one batch per adapter).
        join_every_steps: waiting requests join together at most every this many decode steps (at once when
            nothing runs), so their prompts share one prefill pass: a pass's fixed cost is large on a CPU.

    Requests are admitted in arrival order: one that does not fit yet (rows, or adapters beyond the engine's
    capacity) holds back those behind it, so none starves. A request whose rows fail (its admission, or a
    forward pass of its batch) gets the exception; the others go on.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        max_rows: int,
        on_batch: Callable[[int, int], None] | None = None,
        mix_adapters: bool = True,
        join_every_steps: int = 1,
    ):
        self.engine, self.max_rows, self.on_batch, self.mix_adapters = engine, max_rows, on_batch, mix_adapters
        self.join_every_steps = join_every_steps
        self._steps_since_join = 0
        self._queue: queue.Queue[_Job | Future | None] = queue.Queue()  # new jobs, cancelled futures, close
        self._waiting: deque[_Job] = deque()
        self._rows: dict[LiveRow, tuple[_Job, int]] = {}  # running row -> its job and index in the job
        self._jobs: dict[Future, _Job] = {}  # waiting or running jobs by Future
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="adapterkit-batcher", daemon=True)
        self._thread.start()

    def submit(self, kind: str, rows: list, on_token: TokenCallback | None = None) -> Future:
        """Queue ``rows`` (GenerationRequest for "generate", ClassificationRequest for "classify").

        Returns a Future of the engine's results for these rows, in order, or of the exception that failed
        them. ``on_token(i, live_row, token_id, logprobs)`` is called from the worker thread for each token row i
        emits (``logprobs``: the row's TokenLogprobs so far when asked, else None; read it in the callback).
        """
        job = _Job(kind, rows, on_token=on_token)  # type: ignore[arg-type]
        self._queue.put(job)
        return job.future

    def cancel(self, future: Future) -> None:
        """Cancel the job of ``future``: its rows leave the running batch (and the KV cache) before the next step.
        (Cancelling the Future itself, as asyncio does for an awaiting task that is cancelled, does the same.)"""
        future.cancel()
        self._queue.put(future)

    def depth(self) -> int:
        """Jobs not admitted yet."""
        return self._queue.qsize() + len(self._waiting)

    def running(self) -> int:
        """Rows in the running decode batch."""
        return len(self._rows)

    def close(self) -> None:
        """Stop the worker after the jobs already queued have finished; waits up to 5 s for it."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not (self._closing and not self._waiting and not self._rows):
            self._take(block=not self._waiting and not self._rows)
            for future in [f for f in self._jobs if f.cancelled()]:
                self._cancel(future)
            try:
                self._admit()
                if self._rows:
                    self._step()
            except Exception:  # noqa: BLE001 - keep the worker alive whatever happens
                log.exception("continuous batching step failed")

    def _take(self, block: bool) -> None:
        """Move what arrived (jobs, cancellations, close) from the queue; waits for the first when ``block``."""
        while True:
            try:
                item = self._queue.get(timeout=None) if block and not self._closing else self._queue.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                self._closing = True
            elif isinstance(item, Future):
                self._cancel(item)
            else:
                self._jobs[item.future] = item
                self._waiting.append(item)

    def _cancel(self, future: Future) -> None:
        job = self._jobs.pop(future, None)
        if job is None:
            return
        if job in self._waiting:
            self._waiting.remove(job)
        self._drop(job)
        future.cancel()

    def _drop(self, job: _Job) -> None:
        """Take ``job``'s running rows out of the batch."""
        live = [row for row in job.live if row in self._rows]
        for row in live:
            del self._rows[row]
        if live:
            self.engine.scheduler.cancel(live)

    def _admit(self) -> None:
        """Admit waiting jobs, first come first served, while their rows fit: together, in one prefill pass,
        at most every ``join_every_steps`` steps (at once when nothing runs). Classifications run as they come."""
        if self._rows and self._steps_since_join < self.join_every_steps:
            return
        jobs: list[_Job] = []
        rows = len(self._rows)
        while self._waiting:
            job = self._waiting[0]
            if job.kind == "classify":
                self._waiting.popleft()
                self._classify(job)
                continue
            if rows and rows + len(job.rows) > self.max_rows:
                break
            jobs.append(self._waiting.popleft())
            rows += len(job.rows)
        if jobs:
            self._steps_since_join = 0
            self._start(jobs)

    def _start(self, jobs: list[_Job]) -> None:
        """Start ``jobs`` in the running batch together; alone, in order, when together they fail or do not fit
        (one that does not fit beside the running rows goes back to the front of the queue, with those after it)."""
        if len(jobs) > 1:
            try:
                live = self.engine.start([r for j in jobs for r in j.rows], mix=self.mix_adapters)
            except Exception:  # noqa: BLE001 - find the bad one below
                live = None
            if live is not None:
                start = 0
                for job in jobs:
                    self._register(job, live[start : start + len(job.rows)])
                    start += len(job.rows)
                return
        for k, job in enumerate(jobs):
            if not self._start_one(job):
                self._waiting.extendleft(reversed(jobs[k:]))
                return

    def _start_one(self, job: _Job) -> bool:
        """Start one job; False when its adapters do not fit beside the running rows' yet (it waits)."""
        try:
            live = self.engine.start(job.rows, mix=self.mix_adapters)
        except Exception as err:  # noqa: BLE001 - a bad request fails alone
            self._finish(job, err)
            return True
        if live is not None:
            self._register(job, live)
        elif self._rows:
            return False
        else:  # its adapters alone exceed the engine's capacity: the engine's own passes (generate)
            self._generate_whole(job)
        return True

    def _register(self, job: _Job, live: list[LiveRow]) -> None:
        job.live, job.results = live, [None] * len(live)
        for i, row in enumerate(live):
            self._rows[row] = (job, i)

    def _step(self) -> None:
        self._steps_since_join += 1
        events = self.engine.scheduler.step()
        if self.on_batch and events:
            self.on_batch(len(events), len({e.row.ref for e in events}))
        for event in events:
            if event.row not in self._rows:
                continue  # its job failed or was cancelled
            job, i = self._rows[event.row]
            if event.error is not None:
                del self._rows[event.row]
                self._drop(job)
                self._finish(job, event.error)
                continue
            if event.token is not None and job.on_token is not None:
                try:
                    job.on_token(i, event.row, event.token, event.logprobs)
                except Exception:  # noqa: BLE001 - a consumer's failure must not stop the batch
                    log.exception("on_token failed")
            if event.done is not None:
                del self._rows[event.row]
                job.results[i] = generation_result(event.row.ref, event.row.prompt_ids, event.done)
                if all(r is not None for r in job.results):
                    self._finish(job, None)

    def _classify(self, job: _Job) -> None:
        try:
            results = self.engine.classify(job.rows)
        except Exception as err:  # noqa: BLE001
            self._finish(job, err)
            return
        if self.on_batch:
            self.on_batch(len(job.rows), len({r.adapter for r in job.rows}))
        job.results = results
        self._finish(job, None)

    def _generate_whole(self, job: _Job) -> None:
        try:
            job.results = self.engine.generate(job.rows)
        except Exception as err:  # noqa: BLE001
            self._finish(job, err)
            return
        self._finish(job, None)

    def _finish(self, job: _Job, error: BaseException | None) -> None:
        self._jobs.pop(job.future, None)
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(job.results)
