"""The model's lock: reentrant, and safe to let go of from another thread for a stream.

A streamed answer holds the lock for the generator's whole life. A generator can be closed
(or garbage-collected) in a thread other than the one that started it; with an RLock that
close fails ("cannot release un-acquired lock") and the lock stays held for good, blocking
every other thread. Here a hold taken for a stream remembers its owner, and ending it from
another thread releases the owner's hold.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


class ModelLock:
    """A reentrant lock (acquire/release/with, like threading.RLock) plus holds that any
    thread may end (hold_while)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()   # free: nobody holds the model
        self._state = threading.Lock()   # guards _owner and _count
        self._owner: int | None = None
        self._count = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._state:
            if self._owner == me:
                self._count += 1
                return True
        if not self._mutex.acquire(blocking, timeout):
            return False
        with self._state:
            self._owner, self._count = me, 1
        return True

    def release(self) -> None:
        self._release(threading.get_ident())

    def _release(self, owner: int) -> None:
        with self._state:
            if self._owner != owner or self._count == 0:
                raise RuntimeError("cannot release un-acquired lock")
            self._count -= 1
            if self._count:
                return
            self._owner = None
        self._mutex.release()

    def locked(self) -> bool:
        return self._mutex.locked()

    def __enter__(self) -> "ModelLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def hold_while(self, make: Callable[[], Iterator[T]]) -> Iterator[T]:
        """Yield what make() yields, holding the lock from the first item on; the hold ends
        when the items run out or when this generator is closed, in whichever thread."""
        self.acquire()
        owner = threading.get_ident()
        try:
            yield from make()
        finally:
            self._release(owner)
