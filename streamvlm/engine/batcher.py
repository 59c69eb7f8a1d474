"""One vision forward for the frames of every session waiting at the same moment.

Every session on a loaded model has its own model thread, and each frame read starts with the vision
tower, the largest cost of the whole product. Read one at a time, four sessions pay four forwards
for four frames; a batched forward pays much less per frame on a GPU (and somewhat less on a CPU).
:class:`VisionBatcher`, owned by the adapter (``adapter.batcher``), is where those frames meet:

- :meth:`VisionBatcher.encode` submits the caller's frame and waits. Whichever waiting thread gets
  the model's turn (the adapter's :class:`~streamvlm.models.turns.TurnLock`, at the caller's priority)
  leads: it takes *every* frame pending at that moment (up to ``max_batch`` frames and
  ``max_batch_tokens`` visual tokens; more urgent frames first, then those of the sessions that had the
  model least lately), runs one :meth:`ModelAdapter.encode_batch`, and hands each waiter its own result
  (schedule -> execute -> update). Frames that arrive while a batch runs go in the next one. The other
  waiters leave the lock's queue as soon as their frame is taken.
- A batched forward that raises is re-run frame by frame, so an error reaches only the frame that
  caused it: every waiter gets its own result or its own exception, and nobody waits forever.
- Answers keep pre-empting reads across sessions: between vision layers the leader runs its own
  session's urgent work (its ``pause``) and yields the model to more urgent work of other sessions
  (:meth:`ModelAdapter.yield_turn`). A thread whose frame is in someone else's batch calls its own
  ``pause`` every ``poll_s`` while it waits, so its session's answer queues for the model at once and
  runs at the batch's next layer boundary.
- If a waiter's ``pause`` raises (its worker is stopping), its frame is dropped: taken out of the
  queue, or its result discarded when a batch already holds it. If it was leading, the forward is
  abandoned and the other frames go back to the queue for the next leader.
- Model time is booked fairly: each frame of a batch is billed an equal share of the forward to its
  own thread (:meth:`TurnLock.charge`), not all of it to the leader.

``enabled = False`` (``adapter.vision_batching = False``) is the previous mode: one frame per forward,
in its own thread's turn. Results are the same in both modes. :meth:`VisionBatcher.stats` counts
batches and frames for benchmarks. The batcher knows nothing about sessions, caches or answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..models.base import Hook
from ..models.turns import FRAME

if TYPE_CHECKING:
    import torch

    from ..models.base import ModelAdapter, PreparedFrame

__all__ = ["VisionBatcher", "BatchStats", "choose_batch"]

_PENDING, _RUNNING, _DONE = "pending", "running", "done"


@dataclass
class BatchStats:
    """What the batcher did since it was made (or since :meth:`VisionBatcher.reset_stats`)."""

    batches: int = 0  # vision forwards run for batches (a batch of one counts)
    frames: int = 0  # frames encoded through those forwards
    max_batch: int = 0  # the most frames one forward carried
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many forwards had it
    split: int = 0  # batched forwards that raised and were re-run frame by frame
    failed: int = 0  # frames whose own encode raised (their waiter got the error)
    dropped: int = 0  # frames given up by their waiter (a stopping worker) before their result was taken
    vision_s: float = 0.0  # seconds inside batched forwards (pauses and yields excluded)

    @property
    def mean_batch(self) -> float:
        """Frames per forward on average (0.0 before the first)."""
        return self.frames / self.batches if self.batches else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "frames": self.frames, "mean_batch": round(self.mean_batch, 3), "max_batch": self.max_batch,
                "sizes": dict(sorted(self.sizes.items())), "split": self.split, "failed": self.failed, "dropped": self.dropped,
                "vision_s": round(self.vision_s, 4)}


class _Ticket:
    """One frame waiting for the vision tower, and what became of it."""

    __slots__ = ("frame", "thread", "level", "arrival", "cost", "state", "result", "error", "vision_s", "abandoned")

    def __init__(self, frame: PreparedFrame, thread: threading.Thread, level: int, arrival: int, cost: int) -> None:
        self.frame = frame
        self.thread = thread  # the waiting thread (the session's model thread): whom the model time is billed to
        self.level = level  # the waiter's priority (turns.ANSWER / PROBE / FRAME)
        self.arrival = arrival
        self.cost = cost  # visual tokens, for the batch's cap
        self.state = _PENDING
        self.result: Any = None
        self.error: BaseException | None = None
        self.vision_s = 0.0  # this frame's share of its forward's time
        self.abandoned = False


def choose_batch(pending: Sequence[_Ticket], first: _Ticket | None, usage: Callable[[threading.Thread], float], max_batch: int, max_tokens: int) -> list[_Ticket]:
    """The frames of the next forward: ``first`` (the leader's own, which won the turn), then the most
    urgent, then those of the threads with the least recent model time, then the oldest; at most
    ``max_batch`` frames and ``max_tokens`` visual tokens (a frame over the cap alone still goes alone).
    A batch led by an urgent frame (an answer waits for it) carries only frames at least as urgent."""
    ranked = sorted((t for t in pending if t is not first), key=lambda t: (t.level, usage(t.thread), t.arrival))
    if first is not None and first.level < FRAME:
        # An answer waits for this frame: the batch carries only frames as urgent, since every other frame
        # would add its own encode to the answer's wait (on a CPU a batch costs nearly the sum of its frames).
        ranked = [t for t in ranked if t.level <= first.level]
    batch: list[_Ticket] = [] if first is None else [first]
    tokens = 0 if first is None else first.cost
    for ticket in ranked:
        if len(batch) >= max_batch:
            break
        if batch and tokens + ticket.cost > max_tokens:
            continue
        batch.append(ticket)
        tokens += ticket.cost
    return batch


class _LeaderInterrupted(BaseException):
    """The leader's own ``pause`` raised inside a batched forward (carries what it raised)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


class VisionBatcher:
    """Encodes frames of every thread sharing ``adapter``, several per vision forward. One per adapter."""

    def __init__(self, adapter: ModelAdapter, *, max_batch: int = 8, max_batch_tokens: int = 16384, poll_s: float = 0.05,
                 enabled: bool = True) -> None:
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ConfigError(f"max_batch: must be an integer >= 1, got {max_batch!r}")
        if not (isinstance(max_batch_tokens, int) and max_batch_tokens >= 1):
            raise ConfigError(f"max_batch_tokens: must be an integer >= 1, got {max_batch_tokens!r}")
        if not poll_s > 0:
            raise ConfigError(f"poll_s: must be > 0 seconds, got {poll_s!r}")
        self.adapter = adapter
        self.max_batch = max_batch  # frames per forward at most
        self.max_batch_tokens = max_batch_tokens  # visual tokens per forward at most (one larger frame still goes alone)
        self.poll_s = poll_s  # how often a waiter with a ``pause`` asks it while its frame waits
        self.enabled = enabled
        self._cv = threading.Condition(threading.Lock())
        self._pending: list[_Ticket] = []
        self._arrivals = 0
        self._stats = BatchStats()

    # ---- the caller's side -------------------------------------------------------------------------
    def encode(self, frame: PreparedFrame, *, pause: Callable[[], None] | None = None,
               points: Sequence[torch.nn.Module] = ()) -> tuple[Any, float]:
        """Encode ``frame`` (alone or with other threads' frames) and return (its vision output, its vision seconds).

        ``pause`` is this thread's session work that must not wait (see :meth:`Runner.encode`): called
        between vision layers (``points``) of a forward this thread runs, and every ``poll_s`` while
        its frame waits in another thread's batch. If it raises, this frame is dropped and the
        exception goes on. The vision seconds are this frame's share of its forward, pauses excluded.
        Raises what encoding this frame alone raises.
        """
        if not self.enabled:
            return self._solo(frame, pause, points)
        lock = self.adapter.lock
        level = lock.current_level() if hasattr(lock, "current_level") else FRAME
        with self._cv:
            self._arrivals += 1
            ticket = _Ticket(frame, threading.current_thread(), level, self._arrivals, max(1, self.adapter.batch_cost(frame)))
            self._pending.append(ticket)
        try:
            while ticket.state != _DONE:
                if ticket.state == _PENDING:
                    taken = lambda: ticket.state != _PENDING  # noqa: E731 - asked by the lock under its own mutex
                    if lock.acquire(timeout=self.poll_s if pause is not None else -1, until=taken):
                        try:
                            if ticket.state == _PENDING:
                                self._lead(ticket, pause, points)
                        finally:
                            lock.release()
                        continue
                else:
                    with self._cv:
                        # back to pending too: a leader that stopped hands its batch back
                        self._cv.wait_for(lambda: ticket.state != _RUNNING, self.poll_s if pause is not None else None)
                if pause is not None and ticket.state != _DONE:
                    pause()  # this session's answers queue for the model now; a running batch yields to them
        except BaseException:
            self._drop(ticket)
            raise
        if ticket.error is not None:
            raise ticket.error
        return ticket.result, ticket.vision_s

    def stats(self) -> BatchStats:
        """A copy of the counters (batches, frames, mean and max batch size, splits, failures, drops)."""
        with self._cv:
            s = self._stats
            return BatchStats(s.batches, s.frames, s.max_batch, dict(s.sizes), s.split, s.failed, s.dropped, s.vision_s)

    def reset_stats(self) -> None:
        with self._cv:
            self._stats = BatchStats()

    @property
    def pending(self) -> int:
        """Frames waiting for a forward now."""
        with self._cv:
            return len(self._pending)

    # ---- the leader's side: schedule -> execute -> update -------------------------------------------
    def _lead(self, mine: _Ticket, pause: Callable[[], None] | None, points: Sequence[torch.nn.Module]) -> None:
        """Holding the model: encode every frame pending now (``mine`` first) and hand out the results."""
        lock = self.adapter.lock
        usage = getattr(lock, "usage", lambda thread: 0.0)
        with self._cv:
            batch = choose_batch(self._pending, mine, usage, self.max_batch, self.max_batch_tokens)
            for ticket in batch:
                ticket.state = _RUNNING
            taken = {id(t) for t in batch}
            self._pending = [t for t in self._pending if id(t) not in taken]
        getattr(lock, "wake", lambda: None)()  # their waiters leave the lock's queue and wait for their results
        try:
            results, seconds = self._execute(batch, pause, points)
        except BaseException as exc:  # the leader stops (its pause raised): the rest go back for the next leader
            with self._cv:
                others = [t for t in batch if t is not mine and t.state == _RUNNING and not t.abandoned]
                for ticket in batch:
                    if ticket is not mine and ticket.state == _RUNNING:
                        ticket.state = _PENDING
                self._pending[:0] = others
                self._cv.notify_all()
            getattr(lock, "wake", lambda: None)()
            raise exc.cause if isinstance(exc, _LeaderInterrupted) else exc
        charge = getattr(lock, "charge", None)
        if charge is not None and len(batch) > 1:
            shares: dict[threading.Thread, float] = {}
            for ticket in batch:
                shares[ticket.thread] = shares.get(ticket.thread, 0.0) + seconds / len(batch)
            charge(shares)
        with self._cv:
            for ticket, (result, error) in zip(batch, results):
                ticket.result, ticket.error, ticket.vision_s, ticket.state = result, error, seconds / len(batch), _DONE
                if ticket.abandoned:
                    ticket.result = None
                self._stats.failed += error is not None
            self._cv.notify_all()

    def _execute(self, batch: list[_Ticket], pause: Callable[[], None] | None,
                 points: Sequence[torch.nn.Module]) -> tuple[list[tuple[Any, BaseException | None]], float]:
        """One forward for ``batch`` (or one per frame if it raises): ``[(result, error)]`` in order, and vision seconds."""
        frames = [t.frame for t in batch]
        clock = _PauseClock()
        hooks = self._pause_hooks(points, pause, clock, raise_as_leader=True)
        t0 = time.perf_counter()
        try:
            with self.adapter.hold(hooks):
                outs = self.adapter.encode_batch(frames)
            if len(outs) != len(frames):
                raise RuntimeError(f"encode_batch returned {len(outs)} results for {len(frames)} frames")
            results: list[tuple[Any, BaseException | None]] = [(out, None) for out in outs]
            self._count(len(frames))
        except _LeaderInterrupted:
            raise
        except Exception as exc:
            if len(frames) == 1:
                results = [(None, exc)]
                self._count(1)
            else:  # which frame was it? each alone, so the error reaches only its own waiter
                with self._cv:
                    self._stats.split += 1
                results = []
                for frame in frames:
                    try:
                        with self.adapter.hold(hooks):
                            results.append((self.adapter.encode(frame), None))
                    except _LeaderInterrupted:
                        raise
                    except Exception as one:
                        results.append((None, one))
                    self._count(1)
        seconds = time.perf_counter() - t0 - clock.paused
        with self._cv:
            self._stats.vision_s += seconds
        return results, seconds

    def _count(self, n: int) -> None:
        with self._cv:
            s = self._stats
            s.batches += 1
            s.frames += n
            s.max_batch = max(s.max_batch, n)
            s.sizes[n] = s.sizes.get(n, 0) + 1

    def _pause_hooks(self, points: Sequence[torch.nn.Module], pause: Callable[[], None] | None, clock: _PauseClock,
                     *, raise_as_leader: bool) -> list[Hook]:
        """Pre-hooks on the vision layers: run this thread's ``pause``, then yield to more urgent work of others."""
        owner = threading.get_ident()
        busy = False

        def hook(module: Any, args: Any) -> None:
            nonlocal busy
            if busy or threading.get_ident() != owner:
                return
            busy = True
            p0 = time.perf_counter()
            try:
                if pause is not None:
                    try:
                        pause()
                    except BaseException as exc:
                        if raise_as_leader:
                            raise _LeaderInterrupted(exc) from exc
                        raise
                # Another session's answer waits for the model: let it run between these layers (the vision
                # tower shares nothing with it; this step's hooks come off meanwhile).
                self.adapter.yield_turn()
            finally:
                clock.paused += time.perf_counter() - p0
                busy = False

        return [Hook(m, hook, pre=True) for m in points]

    def _solo(self, frame: PreparedFrame, pause: Callable[[], None] | None, points: Sequence[torch.nn.Module]) -> tuple[Any, float]:
        """The previous mode: this frame alone, in this thread's turn; hooks only when there is a ``pause``."""
        clock = _PauseClock()
        hooks = self._pause_hooks(points, pause, clock, raise_as_leader=False) if pause is not None else []
        with self.adapter.hold(hooks):
            t0 = time.perf_counter()  # from the turn, not from the wait for it
            out = self.adapter.encode(frame)
            seconds = time.perf_counter() - t0 - clock.paused
        self._count(1)
        with self._cv:
            self._stats.vision_s += seconds
        return out, seconds

    def _drop(self, ticket: _Ticket) -> None:
        """Its waiter gives up (its pause raised): out of the queue, or its result thrown away when it comes."""
        with self._cv:
            if ticket.state == _PENDING and ticket in self._pending:
                self._pending.remove(ticket)
            self._stats.dropped += 1
            ticket.abandoned = True
            ticket.result = None


class _PauseClock:
    """Seconds spent in pauses and yields during one forward (not vision time)."""

    __slots__ = ("paused",)

    def __init__(self) -> None:
        self.paused = 0.0
