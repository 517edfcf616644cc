"""Long-lived threads for every piece of model work, one lane (base model) at a time.

MLX keeps resources per thread (its streams) after a Python thread ends, so a thread per request leaks OS
threads. These threads are started once, up to a fixed count, and live until the server closes. Tasks of one
lane (one base model, whose lock a request holds for its whole generation) run one after another; other lanes
run meanwhile, so no worker sits blocked behind a busy base while another base's requests wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Protocol

log = logging.getLogger("mlxman.server")

# Threads for model work: enough to serve a few bases at once; more would only contend for the same cores.
WORKER_THREADS = 4


class Task(Protocol):
    """One piece of model work. ``run`` reports its own outcome and never raises."""

    @property
    def lane(self) -> str | None:
        """Tasks with the same lane run one at a time, in order; None runs beside anything."""

    def run(self) -> None: ...

    def fail(self, error: BaseException) -> None:
        """The task will never run (the workers are closing): report ``error`` to whoever waits."""


class Workers:
    """A bounded set of threads taking tasks oldest first, skipping those whose lane is busy."""

    def __init__(self, count: int = WORKER_THREADS, name: str = "mlxman-worker") -> None:
        if count < 1:
            raise ValueError("at least one worker thread is needed")
        self.count = count
        self._name = name
        self._queue: deque[Task] = deque()
        self._busy_lanes: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._cond = threading.Condition()

    @property
    def threads(self) -> int:
        return len(self._threads)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, task: Task, closed_error: BaseException) -> None:
        """Queue ``task``; once closed, it fails at once with ``closed_error``."""
        with self._cond:
            if not self._closed:
                self._queue.append(task)
                if not self._threads:  # all at once, on first use; none ends before close
                    self._threads = [
                        threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
                        for i in range(self.count)
                    ]
                    for thread in self._threads:
                        thread.start()
                self._cond.notify_all()
                return
        task.fail(closed_error)

    def discard(self, task: Task) -> bool:
        """Take a task that has not started out of the queue; False when it already runs (or ran)."""
        with self._cond:
            try:
                self._queue.remove(task)
            except ValueError:
                return False
            return True

    def fail_queued(self, error: BaseException, *, close: bool = False) -> int:
        """Fail every task that has not started (running ones are left to finish); ``close`` takes no more."""
        with self._cond:
            self._closed = self._closed or close
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for task in queued:
            task.fail(error)
        return len(queued)

    def close(self, error: BaseException, timeout: float) -> bool:
        """Take no more tasks, fail the queued ones, and wait for the threads; False if some still run."""
        self.fail_queued(error, close=True)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self._threads)

    def _next(self) -> Task | None:
        for task in self._queue:
            if task.lane is None or task.lane not in self._busy_lanes:
                self._queue.remove(task)
                return task
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                task = self._next()
                while task is None:
                    if self._closed and not self._queue:
                        return
                    self._cond.wait()
                    task = self._next()
                lane = task.lane
                if lane is not None:
                    self._busy_lanes.add(lane)
            try:
                task.run()
            except BaseException:  # a task must report its own failures; this one is a bug, not fatal
                log.exception("model work failed in a worker thread")
            finally:
                with self._cond:
                    if lane is not None:
                        self._busy_lanes.discard(lane)
                    self._cond.notify_all()
