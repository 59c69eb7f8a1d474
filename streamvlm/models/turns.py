"""Turns on a shared model: a reentrant lock whose waiters are served by priority, then in arrival order.

Every session on a server has its own model thread, and they all take turns on one loaded model, one
forward pass at a time. With a plain lock the turn goes to whichever thread the operating system
wakes, so a question of one session can wait behind a flood of frame reads and watch probes of
another. :class:`TurnLock` serves the most urgent waiter first: a thread says how urgent its next
steps are with :meth:`TurnLock.priority` (lower is sooner; :data:`ANSWER`, :data:`PROBE`,
:data:`FRAME`), and when the model is released the waiter with the lowest priority takes it; among
equals, the thread that has held the model least lately (its hold time, halved every
``half_life_s`` seconds) goes first, then the longest waiting. So a session that floods the model
with questions does not make another session's question wait behind all of its own. Since a read or an answer takes the model once per forward pass (per
token, per vision tower call), an answer waits for at most the one forward in progress; a long
forward that can be suspended (a vision tower, between its layers) calls :meth:`TurnLock.yield_turn`
to let a more urgent waiter of another session run first.

The books of model time are per thread (one model thread per session), kept by the thread object, not
its id: the operating system reuses an ended thread's id, and a new session's thread must not start
with the recent use of an ended one. Books of threads that have ended are dropped. A step that runs work of
several threads in one forward (a batch of vision encodes, :mod:`streamvlm.engine.batcher`) moves
each one's share of the time to it with :meth:`TurnLock.charge`, so the thread that happened to lead
the batch is not billed for the others. Ordering equals by least recent (decayed) model time is a
fair queue on model time, in the spirit of deficit round-robin (Shreedhar & Varghese) but without
its per-round quantum: a step's cost is known only after it ran, so it is billed afterwards, and
sessions that keep the model busy get equal shares of its time whatever their steps cost; one that
was idle comes back first and catches up.

Pure threading; it knows nothing about models or sessions. Reentrant: a thread that holds the lock
may take it again (a question served while that thread's own frame encode is paused). Time comes
from ``clock`` (``time.monotonic`` by default; tests pass a fake one).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager

__all__ = ["TurnLock", "ANSWER", "PROBE", "FRAME"]

#: Priorities: answers (and user control) first, then watch probes, then frame reads.
ANSWER, PROBE, FRAME = 0, 1, 2


class TurnLock:
    """A reentrant lock; waiters get it by priority (lower first), then first come first served."""

    def __init__(self, half_life_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._owner_level = FRAME
        self._owner_book = FRAME  # what the hold in progress is booked as in held_seconds
        self._depth = 0
        self._waiting: list[tuple[int, float, int, int]] = []  # heap of (priority, recent use, arrival, thread id)
        self._arrivals = itertools.count()
        self._local = threading.local()
        self._held_since = 0.0
        self._use: dict[Hashable, tuple[float, float]] = {}  # thread -> (seconds held, decayed; when last updated)
        self._held = [0.0, 0.0, 0.0]  # seconds the model was held, by the kind of work booked (ANSWER, PROBE, FRAME)
        self.half_life_s = half_life_s
        self._clock = clock

    @contextmanager
    def priority(self, level: int, *, book: int | None = None) -> Iterator[None]:
        """Acquisitions by this thread inside the block wait with priority ``level`` (default FRAME).
        Their hold time is booked in :meth:`held_seconds` as ``book`` (default: ``level``): a frame
        read that runs with an answer's priority is still frame work."""
        before = (getattr(self._local, "level", FRAME), getattr(self._local, "book", None))
        self._local.level, self._local.book = level, book
        try:
            yield
        finally:
            self._local.level, self._local.book = before

    def current_level(self) -> int:
        """The priority this thread's acquisitions wait with now (set by :meth:`priority`)."""
        return int(getattr(self._local, "level", FRAME))

    def acquire(self, blocking: bool = True, timeout: float = -1, *, until: Callable[[], bool] | None = None) -> bool:
        """Take the lock (reentrant). False when ``timeout`` passed first, or when ``until`` (asked on
        every :meth:`wake` and release, with the lock's internal mutex held: keep it cheap and lock-free)
        turned true while waiting: the caller no longer needs the model (its work was done by another)."""
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                self._depth += 1
                return True
            level = getattr(self._local, "level", FRAME)
            if self._owner is None and not self._waiting:
                self._take(me, level, 1)
                return True
            if not blocking or (until is not None and until()):
                return False
            return self._wait_turn(level, 1, None if timeout < 0 else timeout, until)

    def _wait_turn(self, level: int, depth: int, timeout: float | None, until: Callable[[], bool] | None = None) -> bool:
        """Queue this thread and wait for its turn (call with ``_cv`` held)."""
        me = threading.get_ident()
        entry = (level, self._recent_use(threading.current_thread(), self._clock()), next(self._arrivals), me)
        heapq.heappush(self._waiting, entry)

        def turn() -> bool:
            return self._owner is None and self._waiting[0] == entry

        if until is None:
            ok = self._cv.wait_for(turn, timeout)
        else:
            ok = self._cv.wait_for(lambda: turn() or until(), timeout) and turn()
        if not ok:
            was_first = self._waiting[0] == entry
            self._waiting.remove(entry)
            heapq.heapify(self._waiting)
            if was_first:  # the next in line may take the model now
                self._cv.notify_all()
            return False
        heapq.heappop(self._waiting)
        self._take(me, level, depth)
        return True

    def _take(self, me: int, level: int, depth: int) -> None:
        self._owner, self._owner_level, self._depth = me, level, depth
        book = getattr(self._local, "book", None)  # _take runs on the taking thread
        self._owner_book = min(max(level if book is None else book, ANSWER), FRAME)
        self._held_since = self._clock()

    def _recent_use(self, thread: Hashable, now: float) -> float:
        used, when = self._use.get(thread, (0.0, now))
        return used * 0.5 ** ((now - when) / self.half_life_s)

    def _give_up(self) -> None:
        """The owner lets go (call with ``_cv`` held): book its hold time, wake the waiters."""
        now = self._clock()
        assert self._owner is not None
        me = threading.current_thread()  # _give_up runs on the owner's thread
        self._use[me] = (self._recent_use(me, now) + now - self._held_since, now)
        self._held[self._owner_book] += now - self._held_since
        if len(self._use) > 1024:  # threads come and go: forget the ended ones, then the ones that used the least
            for thread in [t for t in self._use if isinstance(t, threading.Thread) and not t.is_alive()]:
                del self._use[thread]
            for thread, _ in sorted(self._use.items(), key=lambda kv: kv[1][0])[:max(0, len(self._use) - 512)]:
                del self._use[thread]
        self._owner, self._depth = None, 0
        self._cv.notify_all()

    def usage(self, thread: Hashable) -> float:
        """Recent (decayed) model seconds booked to ``thread`` (a :class:`threading.Thread`, or a key a
        caller billed with :meth:`charge`); lower goes first among equals."""
        with self._cv:
            return self._recent_use(thread, self._clock())

    def held_seconds(self) -> tuple[float, float, float]:
        """Seconds the model has been held since this lock was made, by the kind of work it was held
        for (the ``book`` of :meth:`priority`, else its level): ``(ANSWER, PROBE, FRAME)``, the hold in
        progress included. Only ever grows: take differences to see what each kind of work used over
        an interval (admission by compute does)."""
        with self._cv:
            held = list(self._held)
            if self._owner is not None:
                held[self._owner_book] += self._clock() - self._held_since
            return held[0], held[1], held[2]

    def charge(self, shares: Mapping[Hashable, float]) -> None:
        """Held by this thread: book ``shares`` (thread id -> seconds) of this hold to those threads instead.

        For a step that ran work of several threads at once (a batch of vision encodes): each gets its
        share of the model time, and the holder is billed only for its own. Threads are named by their
        :class:`threading.Thread` object (the holder's own share, under ``threading.current_thread()``,
        stays with it). Seconds are taken off the
        holder's books now and its whole hold is booked when it lets go, so they even out.
        """
        with self._cv:
            if self._owner != threading.get_ident():
                raise RuntimeError("charge() of a TurnLock this thread does not hold")
            me = threading.current_thread()
            now = self._clock()
            moved = 0.0
            for thread, seconds in shares.items():
                if thread == me or seconds <= 0:
                    continue
                self._use[thread] = (self._recent_use(thread, now) + seconds, now)
                moved += seconds
            if moved:
                self._use[me] = (self._recent_use(me, now) - moved, now)

    def wake(self) -> None:
        """Wake every waiter to ask its ``until`` again (call after making one of them true)."""
        with self._cv:
            self._cv.notify_all()

    def more_urgent_waiting(self) -> bool:
        """True when this thread holds the lock and a more urgent thread waits for it."""
        with self._cv:
            return self._owner == threading.get_ident() and bool(self._waiting) and self._waiting[0][0] < self._owner_level

    def yield_turn(self) -> bool:
        """Held by this thread: if a more urgent thread waits, let it (and any others more urgent than
        this thread) take the model first, then take it back at this thread's level and depth.

        Returns True if it yielded. Call it only where the step in progress can be suspended: the
        forward that was running must not share state with what runs meanwhile.
        """
        me = threading.get_ident()
        with self._cv:
            if self._owner != me or not self._waiting or self._waiting[0][0] >= self._owner_level:
                return False
            level, depth = self._owner_level, self._depth
            self._give_up()
            self._wait_turn(level, depth, None)
            return True

    def release(self) -> None:
        with self._cv:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a TurnLock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._give_up()

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def waiting(self) -> int:
        """Threads waiting for their turn now."""
        with self._cv:
            return len(self._waiting)
