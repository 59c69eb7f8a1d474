"""The live worker's request lifecycle and failure paths, with a fake session (the model is not the subject).

Every request asked ends exactly once (``answer.done``, ``gave_up`` or ``request.ended``); an exception in
a step ends that step's request and the worker goes on; a session the engine marks unusable ends the
worker with a ``fatal`` event; a question is answered from every frame submitted before it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvlm import Frame, SamplingConfig, SessionConfig
from streamvlm.dialogue import ControllerConfig
from streamvlm.engine.worker import LiveWorker
from streamvlm.types import Answer, Evidence

TERMINAL = ("answer.done", "gave_up", "request.ended")


@dataclass
class _Encoded:
    pts_s: float
    source_id: str


class FakeStream:
    def __init__(self, session: FakeSession, question: str, t: float, sampling: SamplingConfig) -> None:
        self.session, self.question, self.t, self.sampling = session, question, t, sampling
        self.answer: Answer | None = None
        self.tokens: list[str] = []
        self._it = self._gen()

    def _gen(self):
        for i in range(self.sampling.max_new_tokens):
            if "FAIL" in self.question:
                raise RuntimeError("stack expects each tensor to be equal size")
            if "SLOW" in self.question:
                time.sleep(0.02)
            self.tokens.append("w")
            yield "w "
        self._finish("length")

    def _finish(self, reason: str) -> None:
        if self.answer is None:
            self.answer = Answer(" ".join(self.tokens), tuple(range(len(self.tokens))), self.t,
                                 tuple(Evidence(e.pts_s, e.source_id) for e in self.session.committed), reason, 0.0, 0.0,
                                 self.question)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._finish("cancelled")


@dataclass
class FakeSession:
    """What LiveWorker uses of a StreamSession, with faults on demand; frames are 'read' after ``read_s``."""

    read_s: float = 0.0
    committed: list[_Encoded] = field(default_factory=list)
    broken: str | None = None
    config: SessionConfig = field(default_factory=lambda: SessionConfig(sampling=SamplingConfig(max_new_tokens=3)))
    asked: list[tuple[str, int]] = field(default_factory=list)  # (question, max_new_tokens)
    formats: list[str] = field(default_factory=list)  # the answer_format of each ask_stream
    time_ranges: list = field(default_factory=list)  # the time_range of each ask_stream

    @property
    def last_t(self) -> float:
        return self.committed[-1].pts_s if self.committed else -float("inf")

    def encode_frame(self, frame: Frame, t: float, pause=None) -> _Encoded:
        if frame.source_id == "bad":
            raise RuntimeError("vision tower exploded")
        if frame.source_id == "fatal":
            self.broken = "the cache was left half-written"
            raise RuntimeError("prefill failed")
        deadline = time.monotonic() + self.read_s
        while time.monotonic() < deadline:
            if pause is not None:
                pause()
            time.sleep(0.005)
        return _Encoded(t, frame.source_id)

    def commit_frame(self, encoded: _Encoded, t: float, preempt=None) -> None:
        self.committed.append(_Encoded(t, encoded.source_id))

    def drain_events(self) -> list:
        return []

    def ask_stream(self, question: str, t: float, *, sampling: SamplingConfig, answer_format: str = "auto",
                   time_range: tuple[float, float] | None = None) -> FakeStream:
        self.asked.append((question, sampling.max_new_tokens))
        self.formats.append(answer_format)
        self.time_ranges.append(time_range)
        return FakeStream(self, question, t, sampling)

    def probe(self, prompts: list[str]) -> list[float]:
        return [0.0 for _ in prompts]

    def close(self) -> None:
        pass


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)


async def run_until_quiet(worker: LiveWorker, requests: set[str], timeout: float = 20.0) -> list:
    """Collect events until every request in ``requests`` has ended (or the worker stopped)."""
    seen: list = []
    ended: set[str] = set()

    async def run():
        if not requests:
            return
        async for event in worker.events():
            seen.append(event)
            if event.kind in TERMINAL:
                ended.add(event.data["request_id"])
            if requests <= ended:
                return

    await asyncio.wait_for(run(), timeout)
    return seen


def ends(events: list) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        if e.kind in TERMINAL:
            out.setdefault(e.data["request_id"], []).append(e.kind if e.kind != "request.ended" else e.data["status"])
    return out


def drive(session: FakeSession, script, controller: ControllerConfig | None = None) -> tuple[list, LiveWorker]:
    async def main():
        worker = LiveWorker(session, controller)
        await worker.start()
        asked = await script(worker)
        events = await run_until_quiet(worker, set(asked))
        await worker.stop()
        return events, worker

    return asyncio.run(main())


def test_questions_sent_back_to_back_each_end_exactly_once_with_interrupt():
    async def script(worker):
        return [worker.ask(f"question {i}", request_id=f"r{i}") for i in range(3)]

    events, _ = drive(FakeSession(), script, ControllerConfig(interrupt=True))
    got = ends(events)
    assert set(got) == {"r0", "r1", "r2"} and all(len(v) == 1 for v in got.values())
    assert got["r2"] == ["answer.done"]  # the last question is answered; the ones it replaced end cancelled
    assert all(v in (["cancelled"], ["answer.done"]) for v in got.values())
    assert not [e for e in events if e.kind in ("error", "fatal")]


def test_a_failing_answer_ends_failed_and_the_next_question_is_answered():
    for interrupt in (True, False):
        async def script(worker):
            a = worker.ask("FAIL please", request_id="a")
            await asyncio.sleep(0.2)
            return [a, worker.ask("and now?", request_id="b")]

        events, _ = drive(FakeSession(), script, ControllerConfig(interrupt=interrupt))
        failed = [e for e in events if e.kind == "request.ended" and e.data["request_id"] == "a"]
        assert failed and failed[0].data["status"] == "failed" and failed[0].data["code"] == "engine_fault"
        assert "equal size" in failed[0].data["message"]
        assert ends(events)["b"] == ["answer.done"]


def test_cancel_by_id_ends_only_that_request():
    async def script(worker):
        run = worker.ask("SLOW long answer", request_id="run")
        queued = worker.ask("queued one", request_id="queued")
        worker.cancel("queued")
        return [run, queued]

    session = FakeSession(config=SessionConfig(sampling=SamplingConfig(max_new_tokens=20)))
    events, _ = drive(session, script, ControllerConfig(interrupt=False))
    got = ends(events)
    assert got == {"run": ["answer.done"], "queued": ["cancelled"]}
    done = next(e for e in events if e.kind == "answer.done")
    assert done.data["answer"].finish_reason == "length"  # the running answer was not touched


def test_max_new_tokens_of_one_request_is_honoured():
    async def script(worker):
        return [worker.ask("short", request_id="s", max_new_tokens=2), worker.ask("default", request_id="d")]

    session = FakeSession()
    drive(session, script, ControllerConfig(interrupt=False))
    assert session.asked == [("short", 2), ("default", 3)]


def test_a_failing_frame_is_dropped_with_an_error_and_the_session_goes_on():
    async def script(worker):
        worker.submit_frame(Frame(image(0), 0.0, "bad"))
        await asyncio.sleep(0.1)
        worker.submit_frame(Frame(image(1), 1.0, "cam"))
        return [worker.ask("what now?", request_id="q")]

    events, worker = drive(FakeSession(), script)
    errors = [e for e in events if e.kind == "error"]
    assert errors and errors[0].data["code"] == "engine_fault" and "vision tower exploded" in errors[0].data["message"]
    done = next(e for e in events if e.kind == "answer.done")
    assert [e.pts_s for e in done.data["answer"].evidence] == [1.0]
    c = worker.counters
    assert (c.received, c.dropped, c.ingested) == (2, 1, 1)


def test_an_exception_in_a_control_step_is_an_error_not_a_dead_thread(monkeypatch):
    async def script(worker):
        def boom(*a, **k):
            raise OverflowError("cannot fit 'int' into an index-sized integer")

        monkeypatch.setattr(worker.controller, "add_watch", boom)
        worker.watch("w1", "a red circle")
        await asyncio.sleep(0.1)
        return [worker.ask("still there?", request_id="q")]

    events, _ = drive(FakeSession(), script)
    error = next(e for e in events if e.kind == "error")
    assert error.data["watch_id"] == "w1" and "OverflowError" in error.data["message"]
    assert ends(events)["q"] == ["answer.done"]


def test_an_unusable_session_stops_the_worker_with_a_fatal_event_and_ends_open_requests():
    async def script(worker):
        worker.submit_frame(Frame(image(0), 0.0, "fatal"))
        return [worker.ask("anyone?", request_id="q")]

    events, _ = drive(FakeSession(), script)
    kinds = [e.kind for e in events]
    assert "fatal" in kinds and "half-written" in events[kinds.index("fatal")].data["reason"]
    assert ends(events) == {"q": ["failed"]}


def test_a_question_right_after_a_frame_is_answered_from_it():
    async def script(worker):
        worker.submit_frame(Frame(image(0), 0.0, "cam"))
        worker.submit_frame(Frame(image(1), 0.5, "cam"))  # replaces the first one if it waits (latest wins)
        return [worker.ask("what do you see?", request_id="q")]

    events, _ = drive(FakeSession(read_s=0.2), script)
    done = next(e for e in events if e.kind == "answer.done")
    assert [e.pts_s for e in done.data["answer"].evidence][-1] == 0.5


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("ask"), st.sampled_from(["q", "SLOW q", "FAIL q", "tell me when a red circle appears"])),
        st.tuples(st.just("cancel"), st.integers(-1, 6)),
        st.tuples(st.just("frame"), st.sampled_from(["cam", "bad"])),
        st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.01, 0.03])),
        st.tuples(st.just("end"), st.none()),
    ),
    max_size=14,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, interrupt=st.booleans())
def test_any_interleaving_ends_every_request_exactly_once(ops, interrupt):
    asked: list[str] = []

    async def script(worker):
        t = 0.0
        for op, arg in ops:
            if op == "ask":
                asked.append(worker.ask(arg, request_id=f"r{len(asked)}"))
            elif op == "cancel":
                worker.cancel(None if arg < 0 or arg >= len(asked) else asked[arg])
            elif op == "frame":
                t += 1.0
                worker.submit_frame(Frame(image(int(t)), t, arg))
            elif op == "sleep":
                await asyncio.sleep(arg)
            else:
                worker.end_stream()
        worker.end_stream()  # deferred questions give up at the end, so everything ends
        return asked

    events, _ = drive(FakeSession(read_s=0.01), script, ControllerConfig(interrupt=interrupt))
    got = ends(events)
    assert set(got) == set(asked)
    assert all(len(v) == 1 for v in got.values()), got
    assert not [e for e in events if e.kind == "fatal"]
    for rid in asked:  # nothing about a request after it ended
        last = max(i for i, e in enumerate(events) if e.data.get("request_id") == rid)
        assert events[last].kind in TERMINAL


class _RecordingTurns:
    """Stands in for the model's TurnLock: records the priority each step of the worker waits with."""

    def __init__(self) -> None:
        self.levels: list[int] = []
        self.books: list[int | None] = []

    def priority(self, level: int, *, book: int | None = None):
        import contextlib

        self.levels.append(level)
        self.books.append(book)
        return contextlib.nullcontext()


def test_a_frame_read_that_a_waiting_answer_needs_inherits_the_answers_priority():
    from streamvlm.models.turns import ANSWER, FRAME

    session = FakeSession(read_s=0.3)
    turns = _RecordingTurns()
    session.adapter = type("Adapter", (), {"lock": turns})()
    frame_levels: list[int] = []
    real_encode = session.encode_frame

    def encode(frame, t, pause=None):
        frame_levels.append(turns.levels[-1])
        assert turns.books[-1] == FRAME  # its model time is booked as frame work all the same
        return real_encode(frame, t, pause)

    session.encode_frame = encode

    async def script(worker):
        worker.submit_frame(Frame(image(0), 0.0, "cam"))  # read at once, nobody waits for it
        await asyncio.sleep(0.1)
        worker.submit_frame(Frame(image(1), 1.0, "cam"))  # waits for the first read...
        return [worker.ask("what now?", request_id="q")]  # ...and the question waits for it

    events, _ = drive(session, script)
    assert frame_levels == [FRAME, ANSWER]
    done = next(e for e in events if e.kind == "answer.done")
    assert [e.pts_s for e in done.data["answer"].evidence] == [0.0, 1.0]


def test_a_deferred_answer_is_asked_for_as_one_time():
    """When a "tell me when" fires, its answer says when: the worker asks for a time-shaped answer."""
    class Sees(FakeSession):
        def probe(self, prompts: list[str]) -> list[float]:
            return [1.0 for _ in prompts]

    async def main():
        session = Sees()
        worker = LiveWorker(session)
        await worker.start()
        now = worker.ask("What is there?")
        later = worker.ask("Tell me when a red square appears.")
        for i in range(8):
            worker.submit_frame(Frame(image(i), float(i)))
            await asyncio.sleep(0.02)
        await run_until_quiet(worker, {now, later})
        await worker.stop()
        return session

    session = asyncio.run(main())
    assert session.formats[0] == "auto" and "time" in session.formats[1:]
    # ... within the evidence its rule fired on: the first frame probed (t=0 stands for the second before it,
    # clamped at the stream's start) says yes, so the thing appeared by then.
    deferred = session.time_ranges[session.formats.index("time")]
    assert session.time_ranges[0] is None and deferred is not None and 0.0 <= deferred[0] <= deferred[1] <= 1.0, session.time_ranges
