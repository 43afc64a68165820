"""Read tensors in a background thread while the previous matrix is analysed (bounded queue, errors in order).

``prefetch(names, read, depth)`` yields ``(name, read(name))`` in order. With ``depth >= 1`` a daemon thread calls
``read`` ahead of the consumer, at most ``depth`` items ahead (a bounded queue: memory stays at ``depth + 1``
matrices per checkpoint). An exception raised by ``read(name)`` is delivered to the consumer at that item, after
every earlier item, so work on the earlier matrices is never lost; a ``ThreegateError`` arrives as it was raised (its
message names file and tensor), anything else as a ``CheckpointError`` naming the tensor. Leaving the loop early
(an error downstream, ``KeyboardInterrupt``, ``break``) stops the thread. ``depth = 0`` reads in the caller's
thread: the same items in the same order (the tests compare the two bit for bit).

Reading safetensors through ``safe_open`` copies from a memory-mapped file, and ``Tensor.to(device)`` releases the
GIL, so the thread overlaps I/O and host-to-device copies with the decompositions of the previous matrix.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

from theory.errors import CheckpointError, ThreegateError

__all__ = ["prefetch"]

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _as_threegate(name: str, e: BaseException) -> BaseException:
    if isinstance(e, ThreegateError):
        return e
    return CheckpointError(f"tensor {name!r}: cannot read ({type(e).__name__}: {' '.join(str(e).split())[:200]})")


def prefetch(names: Iterable[str], read: Callable[[str], T], depth: int = 2) -> Iterator[tuple[str, T]]:
    """``(name, read(name))`` for each name, read up to ``depth`` items ahead in a background thread.

    Examples
    --------
    >>> [value for _, value in prefetch(["a", "b"], str.upper, depth=1)]
    ['A', 'B']
    """
    if depth <= 0:
        for name in names:
            try:
                value = read(name)
            except Exception as e:
                raise _as_threegate(name, e) from None
            yield name, value
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for name in names:
                if stop.is_set():
                    return
                try:
                    item: object = (name, read(name))
                except BaseException as e:  # delivered to the consumer in order
                    put((name, _Failed(e)))
                    return
                if not put(item):
                    return
        finally:
            put(_DONE)

    thread = threading.Thread(target=worker, name="threegate-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            name, value = item  # type: ignore[misc]
            if isinstance(value, _Failed):
                raise _as_threegate(name, value.error) from None
            yield name, value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
