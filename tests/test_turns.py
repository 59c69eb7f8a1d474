"""Turns on a shared model: the most urgent waiter goes first, equals in arrival order, reentrant."""

from __future__ import annotations

import threading
import time

import pytest

from streamvlm.models.turns import ANSWER, FRAME, PROBE, TurnLock


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_waiters_are_served_by_priority_then_arrival():
    lock = TurnLock()
    order: list[str] = []
    lock.acquire()  # the model is busy

    def waiter(name: str, level: int) -> None:
        with lock.priority(level), lock:
            order.append(name)

    threads = []
    for name, level in [("frame-1", FRAME), ("probe", PROBE), ("frame-2", FRAME), ("answer-1", ANSWER), ("answer-2", ANSWER)]:
        t = threading.Thread(target=waiter, args=(name, level))
        t.start()
        threads.append(t)
        wait_until(lambda n=len(threads): lock.waiting == n)  # arrival order is the order started
    lock.release()
    for t in threads:
        t.join(10)
    assert order == ["answer-1", "answer-2", "probe", "frame-1", "frame-2"]


def test_reentrant_and_only_the_owner_releases():
    lock = TurnLock()
    with lock:
        with lock:  # a question served inside the thread's own paused encode
            pass
        got = []
        t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.05)))
        t.start()
        t.join()
        assert got == [False]  # still held after the inner release
    with pytest.raises(RuntimeError):
        lock.release()
    assert lock.acquire(blocking=False) and lock.waiting == 0
    lock.release()


def test_a_waiter_that_times_out_does_not_block_the_rest():
    lock = TurnLock()
    lock.acquire()
    results: dict[str, bool] = {}

    def waiter(name: str, level: int, timeout: float) -> None:
        with lock.priority(level):
            results[name] = lock.acquire(timeout=timeout)
            if results[name]:
                lock.release()

    quick = threading.Thread(target=waiter, args=("answer", ANSWER, 0.05))
    patient = threading.Thread(target=waiter, args=("frame", FRAME, 10.0))
    quick.start()
    wait_until(lambda: lock.waiting == 1)
    patient.start()
    quick.join(10)
    lock.release()
    patient.join(10)
    assert results == {"answer": False, "frame": True}


def test_a_suspendable_step_yields_to_a_more_urgent_waiter_and_takes_the_model_back():
    lock = TurnLock()
    order: list[str] = []
    held = threading.Event()
    go = threading.Event()

    def frame_read() -> None:
        with lock.priority(FRAME), lock, lock:  # held twice: the depth comes back too
            order.append("frame: first layers")
            held.set()
            go.wait(10)
            assert lock.yield_turn()
            order.append("frame: last layers")
            assert not lock.yield_turn()  # nobody more urgent waits now

    def answer() -> None:
        with lock.priority(ANSWER), lock:
            order.append("answer")

    reader = threading.Thread(target=frame_read)
    reader.start()
    held.wait(10)
    asker = threading.Thread(target=answer)
    asker.start()
    wait_until(lambda: lock.waiting == 1)
    go.set()
    reader.join(10)
    asker.join(10)
    assert order == ["frame: first layers", "answer", "frame: last layers"]
    assert lock.acquire(blocking=False)  # released fully: depth restored and unwound
    lock.release()


def test_among_equals_the_thread_that_held_the_model_least_lately_goes_first():
    lock = TurnLock()
    order: list[str] = []
    held_once = threading.Event()
    again = threading.Event()

    def hog() -> None:  # one session's flood of questions: it has held the model for a while
        with lock.priority(ANSWER):
            with lock:
                time.sleep(0.2)
            held_once.set()
            again.wait(10)
            with lock:  # and queues again
                order.append("hog")

    def fresh() -> None:  # another session's first question, queued after the hog's
        with lock.priority(ANSWER), lock:
            order.append("fresh")

    flood = threading.Thread(target=hog)
    flood.start()
    held_once.wait(10)
    lock.acquire()  # a third party holds the model while both queue up
    again.set()
    wait_until(lambda: lock.waiting == 1)
    newcomer = threading.Thread(target=fresh)
    newcomer.start()
    wait_until(lambda: lock.waiting == 2)
    lock.release()
    flood.join(10)
    newcomer.join(10)
    assert order == ["fresh", "hog"]


def test_a_waiter_whose_work_was_done_meanwhile_leaves_the_queue():
    # A frame read waits for the model; another thread reads it in a batch meanwhile: the waiter stops
    # waiting at once (it does not hold the model for nothing), and the queue behind it moves on.
    lock = TurnLock()
    done = threading.Event()
    got: list[bool] = []
    lock.acquire()
    waiter = threading.Thread(target=lambda: got.append(lock.acquire(until=done.is_set)))
    waiter.start()
    wait_until(lambda: lock.waiting == 1)
    done.set()
    lock.wake()
    waiter.join(10)
    assert got == [False] and lock.waiting == 0
    lock.release()
    assert lock.acquire(blocking=False)
    lock.release()


def test_model_time_of_a_shared_step_is_billed_to_the_threads_it_served():
    # The leader of a batch ran a 4 s forward for itself and three others: each is billed 1 s, so the
    # leader's next request is not served after everyone else's merely because it led.
    now = [0.0]
    lock = TurnLock(half_life_s=1e9, clock=lambda: now[0])
    me = threading.current_thread()
    with lock:
        now[0] += 4.0
        lock.charge({me: 1.0, 101: 1.0, 102: 1.0, 103: 1.0})
    assert [lock.usage(t) for t in (me, 101, 102, 103)] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(RuntimeError):
        lock.charge({101: 1.0})  # only the holder bills its hold


def test_a_new_thread_that_gets_an_ended_threads_id_starts_with_no_model_time(monkeypatch):
    # The operating system reuses an ended thread's id; a new session's thread must not inherit the
    # recent use (and so the place in the queue) of the thread that had the id before it.
    now = [0.0]
    lock = TurnLock(half_life_s=1e9, clock=lambda: now[0])
    monkeypatch.setattr(threading, "get_ident", lambda: 4242)  # every thread of this test has the same id

    def hold(seconds: float) -> None:
        with lock:
            now[0] += seconds

    old = threading.Thread(target=hold, args=(5.0,))
    old.start()
    old.join(10)
    new = threading.Thread(target=hold, args=(1.0,))
    new.start()
    new.join(10)
    assert lock.usage(old) == pytest.approx(5.0)
    assert lock.usage(new) == pytest.approx(1.0)  # not 6.0: the books follow the thread, not its id


def test_the_books_forget_threads_that_ended_first():
    lock = TurnLock(half_life_s=1e9, clock=lambda: 0.0)
    ended = [threading.Thread(target=lambda: None) for _ in range(1100)]
    for thread in ended:
        thread.start()
        thread.join(10)
    with lock:  # more than 1,024 books when it lets go: the ended threads' go, not the least used
        lock.charge({"a live worker": 0.5, **{thread: 1.0 for thread in ended}})
    assert lock.usage("a live worker") == pytest.approx(0.5)
    assert all(lock.usage(thread) == 0.0 for thread in ended)


def test_held_seconds_add_up_by_the_priority_the_model_was_held_at():
    now = [0.0]
    lock = TurnLock(clock=lambda: now[0])
    with lock.priority(ANSWER), lock:
        now[0] += 2.0
    with lock:  # FRAME by default
        now[0] += 3.0
        assert lock.held_seconds() == (2.0, 0.0, 3.0)  # the hold in progress counts
        with lock.priority(PROBE), lock:  # reentrant: still the frame's hold
            now[0] += 1.0
    with lock.priority(PROBE), lock:
        now[0] += 0.5
    with lock.priority(ANSWER, book=FRAME), lock:  # a frame read an answer waits for: frame work
        now[0] += 1.5
    assert lock.held_seconds() == (2.0, 0.5, 5.5)
