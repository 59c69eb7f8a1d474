"""Training streams whose clock starts late (``--clock-offset``): minute stamps in short streams, and every
time answer speaks the stamp of the frame it rests on."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from streamvlm.errors import ConfigError
from streamvlm.models import load_model
from streamvlm.models.smolvlm import SmolVLMAdapter
from streamvlm.shapeworld.model import FRAME_SIZE, build_untrained
from streamvlm.shapeworld.questions import candidates, parse_clock
from streamvlm.shapeworld.train import StreamLayout, TrainConfig, main, make_stream
from streamvlm.shapeworld.world import make_episode

_STAMP = re.compile(r"Frame from (\d+:\d\d):")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> StreamLayout:
    out = tmp_path_factory.mktemp("shapeworld-untrained")
    build_untrained(out, seed=1)
    adapter = load_model(str(out))
    assert isinstance(adapter, SmolVLMAdapter)
    return StreamLayout(adapter)


def _stamps(layout: StreamLayout, ids: list[int]) -> list[str]:
    return _STAMP.findall(layout.adapter.tokenizer.decode(ids))


def test_late_clocks_stamp_minutes_and_time_answers_name_the_stamp_of_their_frame(layout: StreamLayout) -> None:
    cfg = TrainConfig(clock_offset=1.0, clock_offset_max=1200, mix={"when": 3, "tell": 1, "tell_now": 1, "count": 1})
    tokenizer = layout.adapter.tokenizer
    minutes, timed = set(), 0
    for i in range(8):
        seed, frames = 1_000_000 + i, 12 + i
        stream = make_stream(layout, seed, frames, cfg, short=False)
        stamps = _stamps(layout, stream.ids)
        assert len(stamps) == frames and 1 <= stream.offset <= 1200
        assert [parse_clock(s) for s in stamps] == [float(stream.offset + k) for k in range(frames)]
        minutes |= {s.split(":")[0] for s in stamps}
        truth = candidates(make_episode(seed, duration_s=float(frames), fps=1.0, size=FRAME_SIZE))["backward"]
        for (kind, first, end), (start, _end, evidence) in zip(stream.answers, stream.questions):
            if kind not in ("when", "tell", "tell_now"):
                continue
            spoken = tokenizer.decode(stream.labels[first:end - 1]).strip()
            assert spoken == stamps[evidence], (seed, kind, spoken, evidence)  # the stamp of the frame it rests on
            if kind == "when":  # and that frame is the appearance the event log names
                question = tokenizer.decode(stream.ids[start:first + 1])
                named = [q for q in truth if q.question in question and q.t <= stream.step_of[start] + 1]
                assert any(float(q.answer) == evidence for q in named), (seed, question, spoken)
            timed += 1
    assert timed >= 10
    assert any(int(m) >= 1 for m in minutes) and len(minutes) >= 4  # minute clocks, not only 00:SS


def test_clock_offset_is_drawn_for_its_share_and_leaves_other_streams_as_they_were(layout: StreamLayout) -> None:
    plain = TrainConfig(mix={"when": 1, "count": 1})
    half = replace(plain, clock_offset=0.5, clock_offset_max=600)
    shifted = 0
    for i in range(12):
        before = make_stream(layout, 1_000_000 + i, 10, plain, short=False)
        after = make_stream(layout, 1_000_000 + i, 10, half, short=False)
        assert before.offset == 0
        if after.offset:
            shifted += 1
            assert _stamps(layout, after.ids)[0] != "00:00"
        else:
            assert after.ids == before.ids and after.labels == before.labels
    assert 2 <= shifted <= 10


def test_clock_offset_with_a_budget_still_recalls_the_frame_an_answer_rests_on(layout: StreamLayout) -> None:
    cfg = TrainConfig(clock_offset=1.0, clock_offset_max=900, budgeted=1.0, budget_window=4, mix={"when": 1})
    checked = 0
    for i in range(6):
        stream = make_stream(layout, 1_000_000 + i, 20, cfg, short=False)
        for (start, _end, evidence), frames in zip(stream.questions, stream.recalled):
            assert 0 <= evidence <= stream.step_of[start]
            if evidence < stream.step_of[start] - stream.window + 1:
                assert evidence in frames
                checked += 1
    assert checked >= 3


def test_clock_offset_rejects_bad_values(layout: StreamLayout) -> None:
    for bad in ({"clock_offset": 1.5, "clock_offset_max": 60}, {"clock_offset": 0.5, "clock_offset_max": 0},
                {"clock_offset": 0.5, "clock_offset_max": -3}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError):
        layout.stream(make_episode(1, duration_s=4, fps=1.0, size=FRAME_SIZE), [], offset=-1)
    with pytest.raises(SystemExit):  # the command line names the bad value
        main(["--out", "unused", "--clock-offset", "half"])
