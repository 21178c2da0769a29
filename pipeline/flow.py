"""Run a chain of streaming steps in threads, one thread a step, bounded queues between.

The stages' heavy work happens in numpy and Arrow kernels, which release the
GIL, so extract, normalize and build of one job overlap on separate cores
while each still writes its own stage file. A step is any object with
``feed(item) -> iterable`` and ``finish() -> iterable``; whatever the last
step yields is dropped. The first error in any thread stops every thread and
is raised in the caller's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

__all__ = ["Step", "run_chain"]

_END = object()
_DEPTH = 2  # items waiting between two steps: bounds memory to a few chunks


class Step(Protocol):
    def feed(self, item: Any) -> Iterable[Any]: ...

    def finish(self) -> Iterable[Any]: ...


class _Stop(Exception):
    """Another thread failed: this one stops quietly."""


def run_chain(source: Iterator[Any], steps: list[Step]) -> None:
    """Drive ``source`` through ``steps``; return when all are done, or raise the first error."""
    queues: list[queue.Queue[Any]] = [queue.Queue(_DEPTH) for _ in steps]
    failed = threading.Event()
    errors: list[BaseException] = []

    def put(q: queue.Queue[Any], item: Any) -> None:
        while True:
            if failed.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(q: queue.Queue[Any]) -> Any:
        while True:
            if failed.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def guard(body: Any) -> Any:
        def run() -> None:
            try:
                body()
            except _Stop:
                pass
            except BaseException as e:
                errors.append(e)
                failed.set()

        return run

    def produce() -> None:
        for item in source:
            put(queues[0], item)
        put(queues[0], _END)

    def consume(i: int) -> None:
        step = steps[i]
        nxt = queues[i + 1] if i + 1 < len(steps) else None
        while (item := get(queues[i])) is not _END:
            for out in step.feed(item):
                if nxt is not None:
                    put(nxt, out)
        for out in step.finish():
            if nxt is not None:
                put(nxt, out)
        if nxt is not None:
            put(nxt, _END)

    threads = [threading.Thread(target=guard(produce), name="flow-source", daemon=True)]
    threads += [
        threading.Thread(target=guard(lambda i=i: consume(i)), name=f"flow-step-{i}", daemon=True)
        for i in range(len(steps))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
