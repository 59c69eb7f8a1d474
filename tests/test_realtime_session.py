"""The realtime session core (Sans-I/O): random interleavings of client events and worker outcomes.

The invariant every transport relies on: every ``response.create`` gets exactly one ``response.created``
(at once, carrying its ``event_id``) and exactly one ``response.done``; nothing about a response after
its done; every error names the client event or the response it belongs to (session-level closes aside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from streamvlm.protocol import messages as m
from streamvlm.protocol import session as core
from streamvlm.types import Answer, Evidence

SESSION_LEVEL = ("session_closed", "slow_consumer")


@dataclass
class _Memory:
    kind: str = "compress"
    chunks: int = 1
    tokens_before: int = 10
    tokens_after: int = 5
    up_to_s: float | None = 1.0


def answer(text: str = "a red circle", reason: str = "stop", evidence=(Evidence(1.0, "cam"),)) -> Answer:
    return Answer(text, (1, 2), 1.0, tuple(evidence), reason, 0.1, 0.2, "q")


def user_item(text: str = "What do you see?", event_id: str | None = None) -> m.ItemCreate:
    return m.parse_client_object({"type": "conversation.item.create", "event_id": event_id,
                                  "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = core.RealtimeSession("test-model", policy=core.SessionPolicy(max_watches=2, max_open_responses=3))
        self.sent: list[dict] = []
        self.asked: dict[str, str] = {}  # request id the worker was asked -> client event id
        self.creates = 0
        self.refused: set[str] = set()  # response.create event ids refused for the open-response limit
        self.now = 0.0
        self.submitted = 0  # SubmitFrame commands
        self.compute_drops = 0  # FrameDropped("compute") commands
        self.deliver(self.core.opened(self.now))

    def deliver(self, outs) -> None:
        for out in outs:
            if isinstance(out, dict):
                self.sent.append(out)
            elif isinstance(out, core.Ask):
                self.asked[out.request_id] = ""
            elif isinstance(out, core.SubmitFrame):
                self.submitted += 1
            elif isinstance(out, core.FrameDropped):
                assert out.reason == "compute"
                self.compute_drops += 1

    def client(self, event) -> None:
        self.now += 0.1
        self.deliver(self.core.client_event(event, self.now))

    def worker(self, kind: str, **data) -> None:
        self.now += 0.1
        self.deliver(self.core.worker_event(kind, data, self.now))

    # ---- client events ----
    @rule(text=st.sampled_from(["What now?", "tell me when a red circle appears"]))
    def ask(self, text):
        self.creates += 1
        self.client(user_item(text))
        open_before = len(self.core.open_responses)
        self.client(m.ResponseCreate(event_id=f"c{self.creates}"))
        last = self.sent[-1]
        if last["type"] == "error" and last["error"]["code"] == "response_limit":
            assert open_before >= 3 and last["error"]["event_id"] == f"c{self.creates}"
            self.refused.add(f"c{self.creates}")
        else:  # never more open than the limit
            assert len(self.core.open_responses) <= 3

    @rule()
    def create_without_item(self):
        self.client(m.ResponseCreate(event_id="orphan"))

    @rule(data=st.data())
    def cancel(self, data):
        ids = list(self.asked) + ["resp_unknown", None]
        self.client(m.ResponseCancel(response_id=data.draw(st.sampled_from(ids)), event_id="k"))

    @rule(budget=st.sampled_from([None, 16, 4096, 10**12]))
    def update(self, budget):
        self.client(m.SessionUpdate(budget_tokens=budget, fields_set=frozenset({"memory.budget_tokens"}), event_id="u"))

    @rule(watch_id=st.sampled_from(["a", "b", "c"]))
    def watch(self, watch_id):
        self.client(m.WatchCreate(watch_id=watch_id, condition="a red circle", event_id="w"))

    @rule()
    def frame(self):
        self.client(m.FrameAppend(np.zeros((32, 32, 3), np.uint8), None, "cam", event_id=None))

    @rule(fps=st.sampled_from([None, 0.5, 2.0, 30.0]))
    def read_rate(self, fps):  # the server's admission by compute moves this session's cap
        self.deliver(self.core.set_read_rate(fps))

    @rule(n=st.integers(1, 5))
    def frame_burst(self, n):
        for _ in range(n):
            self.now += 0.01
            self.deliver(self.core.client_event(m.FrameAppend(np.zeros((32, 32, 3), np.uint8), None, "cam", event_id=None), self.now))

    @rule()
    def leave_and_return(self):
        self.deliver(self.core.detached(self.now))
        self.deliver(self.core.resumed(self.now))

    # ---- worker outcomes, for any id asked (also ids already ended: late or duplicate reports) ----
    @precondition(lambda self: self.asked)
    @rule(data=st.data(), outcome=st.sampled_from(["started", "delta", "done", "cancelled", "failed", "gave_up", "ack"]))
    def outcome(self, data, outcome):
        rid = data.draw(st.sampled_from(sorted(self.asked)))
        if outcome == "started":
            self.worker("answer.started", request_id=rid, trigger="user")
        elif outcome == "delta":
            self.worker("answer.delta", request_id=rid, text="a ")
        elif outcome == "done":
            self.worker("answer.done", request_id=rid, answer=answer(reason=data.draw(st.sampled_from(["stop", "length", "cancelled"]))),
                        trigger="user")
        elif outcome in ("cancelled", "failed"):
            self.worker("request.ended", request_id=rid, status=outcome, code="engine_fault" if outcome == "failed" else None,
                        message="boom")
        elif outcome == "gave_up":
            self.worker("gave_up", request_id=rid, question="q", reason="not seen")
        else:
            self.worker("acknowledged", request_id=rid, condition="a red circle")

    @rule()
    def alert(self):
        self.worker("alert", watch_id="a", condition="a red circle", t=1.0, evidence_t=1.0)

    @rule()
    def memory(self):
        self.worker("memory", memory_event=_Memory())

    @rule()
    def commentary(self):
        rid = f"narr-{self.now}"
        self.worker("answer.started", request_id=rid, trigger="commentary")
        self.worker("answer.done", request_id=rid, answer=answer(), trigger="commentary")

    @rule(fatal=st.booleans())
    def worker_dies(self, fatal):
        if fatal:
            self.worker("fatal", reason="the cache was left half-written")
        else:
            self.deliver(self.core.worker_stopped(self.now))

    # ---- the invariant ----
    @invariant()
    def each_response_created_once_and_done_at_most_once_and_nothing_after(self):
        created: dict[str, int] = {}
        done: dict[str, int] = {}
        for event in self.sent:
            kind = event["type"]
            rid = (event.get("response") or {}).get("id") or event.get("response_id")
            if kind == "response.created":
                created[rid] = created.get(rid, 0) + 1
            elif kind == "response.done":
                done[rid] = done.get(rid, 0) + 1
            elif kind in ("response.output_text.delta", "response.acknowledged"):
                assert rid in created and rid not in done, f"{kind} for {rid} outside its life"
            elif kind == "error":
                error = event["error"]
                assert error["event_id"] is not None or error.get("response_id") is not None or error["code"] in SESSION_LEVEL, error
        assert all(n == 1 for n in created.values()) and all(n == 1 for n in done.values())
        assert set(done) <= set(created)
        # every response.create with an item got its response.created carrying its event id, in order
        bound = [e["response"]["client_event_id"] for e in self.sent
                 if e["type"] == "response.created" and e["response"]["client_event_id"] is not None]
        accepted = [f"c{i}" for i in range(1, self.creates + 1) if f"c{i}" not in self.refused]
        assert bound == accepted[:len(bound)]

    @invariant()
    def frames_above_the_compute_cap_are_counted_not_refused_and_the_client_knows_the_cap(self):
        if self.core.closed is None:  # every valid frame was either offered to the worker or dropped for compute
            assert self.core.frames_offered == self.submitted + self.compute_drops
            assert self.core.frames_dropped_compute == self.compute_drops
        assert not any(e["type"] == "error" and e["error"]["code"] == "rate_limited" for e in self.sent)
        told = [e for e in self.sent if e["type"] == core.READ_RATE_EVENT]
        if self.core.attached and self.core.closed is None and (told or self.core.read_rate is not None):
            last = told[-1]
            assert last["limited"] == (self.core.read_rate is not None)
            assert last["fps"] == (None if self.core.read_rate is None else pytest.approx(self.core.read_rate, abs=1e-4))

    def teardown(self) -> None:
        # closing ends every response still open: created == done for all
        self.deliver(self.core.close("the test ends"))
        created = {e["response"]["id"] for e in self.sent if e["type"] == "response.created"}
        done = [e["response"]["id"] for e in self.sent if e["type"] == "response.done"]
        assert sorted(created) == sorted(done)
        if self.core.closed is None:
            return
        resumption = [e for e in self.sent if e["type"] == "session.resumption_update"]
        assert resumption[-1] == {**resumption[-1], "new_handle": None, "resumable": False}


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_two_questions_back_to_back_are_both_created_at_once_bound_to_their_event_ids():
    s = core.RealtimeSession("m")
    s.opened(0.0)
    outs = []
    for i in (1, 2):
        outs += s.client_event(user_item(f"question {i}"), 0.1)
        outs += s.client_event(m.ResponseCreate(event_id=f"q{i}"), 0.1)
    created = [o for o in outs if isinstance(o, dict) and o["type"] == "response.created"]
    asks = [o for o in outs if isinstance(o, core.Ask)]
    assert [c["response"]["client_event_id"] for c in created] == ["q1", "q2"]
    assert [a.request_id for a in asks] == [c["response"]["id"] for c in created]
    assert sum(isinstance(o, core.StartWorker) for o in outs) == 1


def test_a_deferred_question_that_moves_keeps_its_max_output_tokens():
    # The server it was asked on books it for a snapshot; the server it moves to asks it again, the same way.
    s = core.RealtimeSession("m")
    s.opened(0.0)
    s.client_event(user_item("Tell me when a red square appears."), 0.1)
    asked = [o for o in s.client_event(m.ResponseCreate(event_id="d", max_output_tokens=3), 0.1) if isinstance(o, core.Ask)]
    assert [a.max_new_tokens for a in asked] == [3]
    (book,) = s.open_response_books()
    assert book["max_output_tokens"] == 3 and book["trigger"] == "deferred"
    moved = core.RealtimeSession("m")
    again = moved.reopen(book["response_id"], book["trigger"], book["client_event_id"], book["question"], 5.0,
                         book["max_output_tokens"])
    assert again == [core.Ask(book["response_id"], "Tell me when a red square appears.", 3)]
    assert moved.open_response_books() == [book]


def test_a_session_may_have_so_many_responses_open_and_one_more_after_one_ends():
    s = core.RealtimeSession("m", policy=core.SessionPolicy(max_open_responses=2))
    s.opened(0.0)
    asked = []
    for i in (1, 2, 3):
        s.client_event(user_item(f"Tell me when a red square appears ({i})."), 0.1)
        outs = s.client_event(m.ResponseCreate(event_id=f"q{i}"), 0.1)
        asked += [o for o in outs if isinstance(o, core.Ask)]
    errors = [o for o in outs if isinstance(o, dict) and o["type"] == "error"]
    assert len(asked) == 2 and [(e["error"]["code"], e["error"]["event_id"]) for e in errors] == [("response_limit", "q3")]
    s.worker_event("request.ended", {"request_id": asked[0].request_id, "status": "cancelled", "code": None, "message": "x"}, 0.2)
    again = s.client_event(m.ResponseCreate(event_id="q3"), 0.3)  # the user message stayed: the same create works now
    assert [o.text for o in again if isinstance(o, core.Ask)] == ["Tell me when a red square appears (3)."]


def test_a_failed_request_ends_failed_with_an_error_naming_it():
    s = core.RealtimeSession("m")
    s.opened(0.0)
    s.client_event(user_item("why?"), 0.1)
    rid = next(o.request_id for o in s.client_event(m.ResponseCreate(event_id="e1"), 0.1) if isinstance(o, core.Ask))
    outs = s.worker_event("request.ended", {"request_id": rid, "status": "failed", "code": "engine_fault", "message": "boom"}, 0.2)
    error, done = outs
    assert error["error"] == {**error["error"], "code": "engine_fault", "event_id": "e1", "response_id": rid}
    assert done["response"]["status"] == "failed" and done["response"]["error"]["code"] == "engine_fault"


def test_cancel_of_an_unknown_response_is_response_not_found_and_cancels_nothing():
    s = core.RealtimeSession("m")
    s.opened(0.0)
    s.client_event(user_item("why?"), 0.1)
    s.client_event(m.ResponseCreate(event_id="e1"), 0.1)
    outs = s.client_event(m.ResponseCancel(response_id="resp_nope", event_id="k1"), 0.2)
    assert [o["error"]["code"] for o in outs] == ["response_not_found"] and outs[0]["error"]["event_id"] == "k1"


def test_budget_limits_and_watch_limits_are_error_events():
    s = core.RealtimeSession("m", policy=core.SessionPolicy(4096, 8192, max_watches=2))
    s.opened(0.0)
    for budget in (10**12, None):
        out = s.client_event(m.SessionUpdate(budget_tokens=budget, fields_set=frozenset({"memory.budget_tokens"}), event_id="u"), 0.1)
        assert out[0]["error"]["code"] == "budget_too_large" and s.budget_tokens == 4096
    codes = []
    for i in range(4):
        outs = s.client_event(m.WatchCreate(watch_id=f"w{i}", condition="a dog", event_id=f"w{i}"), 0.1)
        codes += [o["error"]["code"] for o in outs if isinstance(o, dict) and o["type"] == "error"]
    assert codes == ["watch_limit", "watch_limit"] and len(s.watches) == 2


def test_what_a_client_missed_while_away_is_delivered_on_resume_with_a_new_handle():
    s = core.RealtimeSession("m")
    first = s.opened(0.0)[-1]["new_handle"]
    s.client_event(user_item("tell me when a dog appears"), 0.1)
    rid = next(o.request_id for o in s.client_event(m.ResponseCreate(event_id="e1"), 0.1) if isinstance(o, core.Ask))
    s.detached(1.0)
    assert s.worker_event("answer.done", {"request_id": rid, "answer": answer(), "trigger": "deferred"}, 2.0) == []
    back = s.resumed(3.0)
    assert [e["type"] for e in back] == ["session.created", "response.done", "session.resumption_update"]
    assert back[1]["response"]["client_event_id"] == "e1" and back[-1]["new_handle"] not in (None, first)


def frame(core_: core.RealtimeSession, now: float) -> list:
    return core_.client_event(m.FrameAppend(np.zeros((32, 32, 3), np.uint8), None, "cam", event_id=None), now)


def test_a_compute_cap_drops_frames_above_it_quietly_and_is_announced_set_and_lifted():
    s = core.RealtimeSession("test-model")
    s.opened(0.0)
    assert s.set_read_rate(None) == []  # nothing changes: nothing to say
    [event] = s.set_read_rate(1.0)
    assert event["type"] == "input_frame.rate" and (event["limited"], event["fps"], event["reason"]) == (True, 1.0, "compute")
    assert s.set_read_rate(1.0) == []
    outs = [out for k in range(50) for out in frame(s, 0.1 * (k + 1))]  # 10 frames/s for 5 s
    submitted = [o for o in outs if isinstance(o, core.SubmitFrame)]
    assert 5 <= len(submitted) <= 7  # one a second (the first two at once)
    assert [o for o in outs if isinstance(o, core.FrameDropped)] == [core.FrameDropped("compute")] * (50 - len(submitted))
    assert not [o for o in outs if isinstance(o, dict)]  # no error per dropped frame
    assert (s.frames_offered, s.frames_dropped_compute) == (50, 50 - len(submitted))
    [lifted] = s.set_read_rate(None)
    assert (lifted["limited"], lifted["fps"]) == (False, None)
    after = [o for k in range(10) for o in frame(s, 6 + 0.1 * k)]
    assert sum(isinstance(o, core.SubmitFrame) for o in after) == 10


def test_a_cap_set_while_the_client_is_away_is_announced_on_its_return():
    s = core.RealtimeSession("test-model")
    s.opened(0.0)
    s.detached(1.0)
    assert s.set_read_rate(0.25) == []
    back = s.resumed(2.0)
    [rate] = [e for e in back if isinstance(e, dict) and e["type"] == "input_frame.rate"]
    assert rate["fps"] == 0.25 and back[-1]["type"] == "session.resumption_update"
    s.detached(3.0)
    s.set_read_rate(None)
    [lifted] = [e for e in s.resumed(4.0) if isinstance(e, dict) and e["type"] == "input_frame.rate"]
    assert lifted["limited"] is False
    assert not [e for e in s.resumed(5.0) if isinstance(e, dict) and e["type"] == "input_frame.rate"]  # nothing new


def test_the_python_client_exposes_the_cap_the_core_announces():
    from streamvlm_client import AsyncClient

    s = core.RealtimeSession("test-model")
    s.opened(0.0)
    client = AsyncClient(event_buffer=0)
    assert client.read_rate is None
    for event in s.set_read_rate(0.4):
        client._dispatch(event)
    assert client.read_rate == 0.4
    for event in s.set_read_rate(None):
        client._dispatch(event)
    assert client.read_rate is None


@pytest.mark.parametrize("fps", [0, -1.0, float("nan"), float("inf"), True])
def test_a_read_rate_that_is_not_a_positive_number_is_refused(fps):
    from streamvlm.errors import ConfigError

    s = core.RealtimeSession("test-model")
    with pytest.raises(ConfigError):
        s.set_read_rate(fps)
    assert s.read_rate is None


def test_a_capped_session_gets_no_burst_after_a_pause():
    """Frames under a compute cap pass evenly spaced: a burst would only wait in the worker and be replaced."""
    s = core.RealtimeSession("test-model")
    s.opened(0.0)
    s.set_read_rate(5.0)
    passed = [o for k in range(20) for o in frame(s, 10.0 + k * 0.001) if isinstance(o, core.SubmitFrame)]
    assert len(passed) == 2  # one, and one to make up for a frame that came late
    assert s.frames_dropped_compute == 18
