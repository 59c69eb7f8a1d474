"""A fleet camera's controller snapshot sits on shared storage with its checksum beside it: whoever can
write there can replace both. Loading it must never run what it names, only rebuild a controller."""

from __future__ import annotations

import os
import pickle

import pytest

from streamvlm.dialogue import DialogueController, TriggerSpec
from streamvlm.errors import InputError
from streamvlm.fleet.camera import load_controller


def test_a_controller_with_watches_rules_and_waiting_questions_comes_back_whole():
    controller = DialogueController()
    controller.add_watch("w1", "a red circle appears", 0.0)
    controller.add_watch("w2", "a blue square appears", 0.0, spec=TriggerSpec(kind="zscore"))
    controller.add_watch("w3", "a green ball appears", 0.0, spec=TriggerSpec(kind="sum"))
    for t in range(6):
        controller.frame(float(t))
        controller.scores(float(t), {"w1": 0.7, "w2": 0.1, "w3": 0.5})
    controller.user_message("r1", "Tell me when a yellow triangle appears", 6.0)
    back = load_controller(pickle.dumps(controller, protocol=pickle.HIGHEST_PROTOCOL))
    assert dict(back.watches) == dict(controller.watches)
    assert back.pending_deferred == controller.pending_deferred == ("r1",)
    assert back.last_t == controller.last_t and dict(back.frames_seen) == dict(controller.frames_seen)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_snapshot_that_names_anything_else_is_refused_before_it_runs(monkeypatch):
    blobs = (pickle.dumps(_RunsCode()), pickle.dumps({"controller": _RunsCode()}), pickle.dumps(print), b"not a pickle")
    called: list[str] = []
    monkeypatch.setattr(f"{os.name}.system", lambda command: called.append(command) or 0)  # what the pickle names
    pickle.loads(blobs[0])  # a plain load runs it (here, the harmless stand-in)
    assert called == ["echo pwned > /dev/null"]
    called.clear()
    for blob in blobs:
        with pytest.raises(InputError, match="cannot be read as a controller snapshot"):
            load_controller(blob, "cam/gen-00000001/controller.pkl")
    assert called == []
    with pytest.raises(InputError, match="not a dialogue controller"):
        load_controller(pickle.dumps([1, 2, 3]))
