"""Bounded memory through a real (tiny) model: the budget holds, big budgets are exact, retrieval works."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from streamvlm import MemoryConfig, SamplingConfig, SessionConfig, StreamSession
from streamvlm.config import POLICIES
from streamvlm.engine.check import synthetic_frames
from streamvlm.memory.manager import INDEX_VECTORS

from conftest import load

SIZES = [(48, 64), (96, 128), (120, 200)]  # different sizes give Qwen frames different token counts


def check_budget(session: StreamSession, cfg: MemoryConfig) -> None:
    ledger = session.memory.ledger
    budget = session.memory.budget()
    assert ledger.working_tokens() <= cfg.budget_tokens
    assert ledger.working_tokens(("frame",)) <= budget.frames
    assert ledger.working_tokens(("question", "answer")) <= budget.dialogue
    assert ledger.working_tokens() == session.runner.cache_length  # the books match the tensors
    for chunk in ledger.working():
        assert session.memory.positions[chunk.chunk_id].shape[1] == chunk.tokens_held


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("positions", ["keep", "reindex"])
@settings(max_examples=6, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_budget_is_never_exceeded(policy, positions, data):
    name = data.draw(st.sampled_from(["tiny-qwen2.5-vl", "tiny-smolvlm"]))
    adapter = load(name)
    cfg = MemoryConfig(budget_tokens=data.draw(st.integers(160, 320)), policy=policy, positions=positions,
                       recent_frames=data.draw(st.integers(1, 3)), store_ram_bytes=data.draw(st.sampled_from([0, 20_000, 10**7])))
    session = StreamSession(adapter, SessionConfig(system_prompt="Watch."), cfg)
    t = 0.0
    steps = data.draw(st.lists(st.sampled_from(["frame", "frame", "frame", "same", "ask"]), min_size=4, max_size=14))
    rng = np.random.default_rng(len(steps))
    last = None
    for step in steps:
        t += 0.5
        if step == "ask":
            session.ask("What was first?", t, sampling=SamplingConfig(max_new_tokens=data.draw(st.integers(1, 6))))
        else:
            h, w = SIZES[int(rng.integers(len(SIZES)))]
            frame = last if (step == "same" and last is not None) else synthetic_frames(1, height=h, width=w, seed=int(rng.integers(1 << 30)))[0]
            session.ingest(frame, t)
            last = frame
        check_budget(session, cfg)
    session.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_a_budget_larger_than_the_stream_is_exact(adapter, policy):
    frames = synthetic_frames(4, seed=11)

    def run(memory: MemoryConfig | None) -> torch.Tensor:
        session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=4)), memory)
        for i, f in enumerate(frames):
            session.ingest(f, float(i))
        session.ask("What moved?")
        stream = session.ask_stream("And then?", return_logits=True)
        stream.result()
        assert not session.drain_events() or memory is None
        return stream.logits

    assert torch.equal(run(None), run(MemoryConfig(budget_tokens=100_000, policy=policy, merge_similarity=1.0)))


def test_compression_and_eviction_emit_events(smol):
    cfg = MemoryConfig(budget_tokens=300, policy="infinipot", recent_frames=1)
    session = StreamSession(smol, SessionConfig(system_prompt="Watch."), cfg)
    for i, f in enumerate(synthetic_frames(24, seed=2)):
        session.ingest(f, float(i))
    events = session.drain_events()
    kinds = {e.kind for e in events}
    assert {"compressed", "evicted"} <= kinds
    for e in events:
        assert e.tokens_after <= e.tokens_before and e.up_to_s is not None
    compressed = [c for c in session.memory.ledger.all() if c.compressed]
    assert compressed and all(c.tokens_held < c.tokens_seen for c in compressed)
    stats = session.stats()
    assert stats["chunks_stored"] > 0 and stats["store_ram_bytes"] > 0
    assert stats["logical_tokens"] > stats["working_tokens"] == stats["cache_tokens"]
    assert stats["budget_bytes"] >= stats["working_bytes"]
    assert session.drain_events() == []


def test_merge_folds_identical_frames(smol):
    session = StreamSession(smol, memory=MemoryConfig(budget_tokens=400, policy="merge"))
    frame = synthetic_frames(1)[0]
    for i in range(5):
        session.ingest(frame, float(i))
    frames = [c for c in session.memory.ledger.working() if c.kind == "frame"]
    assert len(frames) == 1 and frames[0].merged_frames == 5 and (frames[0].t_start, frames[0].t_end) == (0.0, 4.0)
    assert [e.kind for e in session.drain_events()] == ["merged"] * 4


def test_retrieved_chunks_reach_the_model_and_memory_is_restored(adapter):
    def session_with(top_k: int) -> StreamSession:
        session = StreamSession(adapter, SessionConfig(system_prompt="Watch.", sampling=SamplingConfig(max_new_tokens=3)),
                                MemoryConfig(budget_tokens=200, policy="window", recent_frames=1, retrieval_top_k=top_k))
        for i, f in enumerate(synthetic_frames(10, seed=4)):
            session.ingest(f, float(i))
        assert session.stats()["chunks_stored"] >= 3
        return session

    with_store, without = session_with(2), session_with(0)
    keys_before = [layer.keys.clone() for layer in with_store.runner.cache.layers]
    held = with_store.runner.cache_length
    s1 = with_store.ask_stream("What was at the very beginning?", return_logits=True)
    a1 = s1.result()
    s2 = without.ask_stream("What was at the very beginning?", return_logits=True)
    a2 = s2.result()
    stored_times = {c.t_start for c in with_store.memory.ledger.all() if c.tier == "store" and c.kind == "frame"}
    retrieved = [e.pts_s for e in a1.evidence if e.pts_s in stored_times]
    assert len(retrieved) >= 1  # evidence names frames that came back from the store
    assert not any(e.pts_s in stored_times for e in a2.evidence)
    assert not torch.allclose(s1.logits[0], s2.logits[0])  # withholding them changes what the model computes
    # after the answer the retrieved tokens are gone; earlier working memory is untouched
    for layer, before in zip(with_store.runner.cache.layers, keys_before):
        assert torch.equal(layer.keys[:, :, :held], before)
    assert with_store.memory.ledger.working_tokens() == with_store.runner.cache_length


def test_a_stored_frame_is_indexed_by_its_visual_tokens(smol):
    """The index keys of an evicted frame are the mean position-free keys of runs of its image tokens (one
    vector per run, scored by the best): the timestamp text before them would make every question match
    clock digits rather than what the frame shows."""
    session = StreamSession(smol, SessionConfig(system_prompt="Watch."), MemoryConfig(budget_tokens=200, recent_frames=1))
    for i, f in enumerate(synthetic_frames(8, seed=3)):
        session.ingest(f, float(i))
    stored = [c for c in session.memory.ledger.all() if c.tier == "store" and c.kind == "frame"]
    assert stored and all(0 < c.protected_prefix < c.tokens_held for c in stored)
    for chunk in stored:
        record, keys, _ = session.memory.store.get(chunk.chunk_id)
        positions = torch.arange(record.position_start, record.position_end)[None]
        unrotated = [session.memory.rotator.unrotate(k.float(), positions) for k in keys]
        runs = [torch.tensor_split(k[:, chunk.protected_prefix :], INDEX_VECTORS, dim=1) for k in unrotated]
        expected = torch.stack([torch.stack([run.mean(dim=1) for run in layer]) for layer in runs])  # [L, V, H, D]
        everything = torch.stack([torch.stack([run.mean(dim=1) for run in torch.tensor_split(k, INDEX_VECTORS, dim=1)])
                                  for k in unrotated])
        entry = session.memory.store.index_entry(chunk.chunk_id).reshape(expected.shape).float()
        assert torch.allclose(entry, expected, atol=1e-5)
        assert not torch.allclose(entry, everything, atol=1e-3)
    session.close()


def test_store_overflow_is_reported_not_silent(smol):
    session = StreamSession(smol, SessionConfig(system_prompt="Watch."), MemoryConfig(budget_tokens=200, store_ram_bytes=10_000, store_disk_bytes=0))
    for i, f in enumerate(synthetic_frames(12, seed=9)):
        session.ingest(f, float(i))
    stats = session.stats()
    assert stats["chunks_dropped"] > 0
    assert any(e.kind == "dropped" for e in session.drain_events())
    assert stats["store_ram_bytes"] <= 10_000


def test_reindex_keeps_positions_contiguous(adapter):
    session = StreamSession(adapter, SessionConfig(system_prompt="Watch."), MemoryConfig(budget_tokens=220, positions="reindex"))
    for i, f in enumerate(synthetic_frames(8, seed=1)):
        session.ingest(f, float(i))
    working = session.memory.ledger.working()
    assert working[0].position_start == 0 and working[0].kind == "system"
    # After the system prompt, room for what retrieval places before the first working chunk (the
    # default number of chunks, each the size of a frame): recalled frames never take the system prompt's positions.
    frame_tokens = max(c.tokens_held for c in working if c.kind == "frame")
    depth = MemoryConfig().retrieval_top_k
    assert working[1].position_start - working[0].position_end == depth * frame_tokens
    for a, b in zip(working[1:], working[2:]):
        assert b.position_start == a.position_end
    assert session.runner.next_position == working[-1].position_end
    assert any(e.kind == "reindexed" for e in session.drain_events())
    assert len(session.memory.store) > 0
    recalled = session.memory.retrieve(adapter.question_ids("What was there first?"))
    assert recalled is not None and len(recalled.evidence) <= depth
    placed = recalled.end - recalled.start  # they go just before the first working chunk, inside the room
    assert working[1].position_start - placed >= working[0].position_end
    session.memory.release(recalled)


def test_recall_room_is_capped_and_retrieval_recalls_only_what_fits(adapter, monkeypatch):
    """A model with few positions: the room left for recalled chunks is at most a quarter of them, and a
    question recalls the best chunks that fit there, never onto the system prompt's positions."""
    monkeypatch.setattr(adapter, "max_positions", lambda: 300)
    session = StreamSession(adapter, SessionConfig(system_prompt="Watch."),
                            MemoryConfig(budget_tokens=200, positions="reindex", retrieval_top_k=12))
    for i, f in enumerate(synthetic_frames(16, seed=2)):
        session.ingest(f, float(i))
    working = session.memory.ledger.working()
    room = working[1].position_start - working[0].position_end
    frame_tokens = max(c.tokens_held for c in working if c.kind == "frame")
    assert room == min(12 * frame_tokens, 300 // 4)
    # The room is in positions (a Qwen frame's image tokens share positions: fewer positions than tokens).
    span = min(r.position_end - r.position_start for r in session.memory.store.records() if r.kind == "frame")
    assert len(session.memory.store) > room // span  # more is stored than fits
    recalled = session.memory.retrieve(adapter.question_ids("What was there first?"))
    assert recalled is not None and 1 <= len(recalled.evidence) <= room // span
    session.memory.release(recalled)
    session.close()


def _feed_and_capture(session: StreamSession, frames) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Ingest frames; remember each frame chunk's keys (layer 0) and positions as fed."""
    from streamvlm.memory import cache as kv

    captured = {}
    for i, f in enumerate(frames):
        session.ingest(f, float(i))
        chunk = [c for c in session.memory.ledger.all() if c.kind == "frame"][-1]
        if chunk.tier == "working":
            start = session.memory.ledger.offset(chunk.chunk_id)
            keys, _ = kv.extract(session.runner.cache, start, start + chunk.tokens_held)
            captured.setdefault(chunk.chunk_id, (keys[0], session.memory.positions[chunk.chunk_id].clone()))
    return captured


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_keys_and_positions_always_move_together(adapter, positions, monkeypatch):
    """No path shifts positions without re-rotating: un-rotating a chunk's keys by its booked positions
    gives the same position-free keys as when it was fed, after evictions, re-indexing and rebases."""
    from streamvlm.memory import cache as kv

    monkeypatch.setattr(adapter, "max_positions", lambda: 300)  # keep mode rebases past 150
    session = StreamSession(adapter, SessionConfig(system_prompt="Watch."), MemoryConfig(budget_tokens=200, positions=positions))
    captured = _feed_and_capture(session, synthetic_frames(24, seed=8))
    rotator = session.memory.rotator
    assert any(e.kind == "reindexed" for e in session.drain_events())
    assert session.runner.next_position <= 300
    checked = 0
    for chunk in session.memory.ledger.working():
        if chunk.kind != "frame" or chunk.chunk_id not in captured:
            continue
        start = session.memory.ledger.offset(chunk.chunk_id)
        keys_now = kv.extract(session.runner.cache, start, start + chunk.tokens_held)[0][0]
        keys_then, positions_then = captured[chunk.chunk_id]
        now_free = rotator.unrotate(keys_now.float(), session.memory.positions[chunk.chunk_id])
        then_free = rotator.unrotate(keys_then.float(), positions_then)
        assert torch.allclose(now_free, then_free, atol=1e-4)
        checked += 1
    assert checked >= 1


def test_closing_the_session_removes_the_store_files(smol, tmp_path):
    store_dir = tmp_path / "store"
    session = StreamSession(smol, SessionConfig(system_prompt="Watch."),
                            MemoryConfig(budget_tokens=200, store_ram_bytes=0, store_disk_bytes=10**8, store_dir=str(store_dir)))
    for i, f in enumerate(synthetic_frames(10, seed=3)):
        session.ingest(f, float(i))
    assert session.stats()["store_disk_bytes"] > 0 and any(store_dir.iterdir())
    assert any(e.kind == "spilled" for e in session.drain_events()) or session.stats()["store_ram_bytes"] == 0
    session.close()
    assert not store_dir.exists() or not any(store_dir.iterdir())


def test_single_frame_larger_than_the_budget_is_refused(smol):
    from streamvlm.errors import CapacityError

    session = StreamSession(smol, SessionConfig(system_prompt="Watch."), MemoryConfig(budget_tokens=45, text_budget_tokens=10))
    with pytest.raises(CapacityError, match="does not fit"):
        session.ingest(synthetic_frames(1)[0], 0.0)
    assert session.stats()["frames"] == 0


def test_ledger_keeps_departed_chunks_compactly_and_exactly():
    """Chunks that left working memory read back unchanged, count right, and cost no object each."""
    import tracemalloc

    from streamvlm.memory.ledger import DROPPED, MERGED, STORE, Ledger

    ledger = Ledger()
    ledger.add("system", 0.0, 0.0, "", 0, 5, 5)
    for i in range(1, 7):
        ledger.add("frame" if i % 3 else "question", float(i), i + 0.5, f"cam{i % 2}", 10 * i, 10 * i + 8, 8, protected_prefix=2)
    ledger[1].tokens_held, ledger[1].compressed, ledger[1].epoch = 4, True, 3
    snapshot = ledger.to_dict()
    ledger.leave_working(1, STORE)
    ledger.leave_working(2, MERGED)
    ledger.leave_working(3, STORE)
    ledger.set_tier(3, DROPPED)
    assert [c.chunk_id for c in ledger.working()] == [0, 4, 5, 6]
    assert ledger.counts() == {"working": 4, "store": 1, "merged": 1, "dropped": 1}
    assert ledger.logical_tokens() == 5 + 6 * 8 and len(ledger) == 7
    one = ledger[1]
    assert (one.tier, one.tokens_held, one.compressed, one.epoch, one.source_id, one.protected_prefix) == (STORE, 4, True, 3, "cam1", 2)
    assert ledger[3].kind == "question" and ledger[3].tier == DROPPED
    # Apart from the tiers, the books are what they were before the chunks left.
    before = {c["chunk_id"]: c for c in snapshot["chunks"]}
    for c in ledger.to_dict()["chunks"]:
        assert {**c, "tier": "working"} == before[c["chunk_id"]]
    again = Ledger.from_dict(ledger.to_dict())
    assert again.to_dict() == ledger.to_dict() and again.counts() == ledger.counts()
    with pytest.raises(KeyError):
        ledger[99]

    # Thousands of departed chunks cost about a hundred bytes each, not an object each.
    for i in range(7, 1007):
        ledger.add("frame", float(i), float(i), "cam0", 10 * i, 10 * i + 8, 8)
        ledger.leave_working(i, STORE)
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot()
        for i in range(1007, 5007):
            ledger.add("frame", float(i), float(i), "cam0", 10 * i, 10 * i + 8, 8)
            ledger.leave_working(i, STORE)
        grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(start, "filename"))
    finally:
        tracemalloc.stop()
    assert ledger.counts()["store"] == 5001 and ledger[4000].t_start == 4000.0
    assert grown / 4000 < 200, f"{grown / 4000:.0f} bytes per departed chunk"


def test_closing_the_session_removes_its_temporary_store_directory(smol):
    session = StreamSession(smol, SessionConfig(system_prompt="Watch."),
                            MemoryConfig(budget_tokens=200, store_ram_bytes=0, store_disk_bytes=10**8))
    for i, f in enumerate(synthetic_frames(6, seed=3)):
        session.ingest(f, float(i))
    directory = session.memory.store.directory
    assert directory is not None and session.stats()["store_disk_bytes"] > 0 and any(directory.iterdir())
    session.close()
    assert not directory.exists()


# ---- long streams: every policy, both position strategies, to the end ------------------------------------
def _mostly_changing_frames(n: int, seed: int) -> list[np.ndarray]:
    """``n`` frames of uniform noise, every eighth a repeat of the one before (which ``merge`` folds)."""
    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    for i in range(n):
        frames.append(frames[-1] if i % 8 == 7 else rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return frames


@pytest.mark.parametrize("positions", ["keep", "reindex"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_long_stream_runs_to_the_end_under_every_policy(smol, policy, positions):
    # Issue 14: at the default budget of `streamvlm watch` (4096 tokens, about half the model's position
    # range) `merge` crashed after ~134 frames with "Inplace update to inference tensor outside
    # InferenceMode": merges had left gaps, and when the positions passed half the range in a step that
    # compacted nothing else, the kept keys (just made by a forward pass) were re-rotated in place. Here
    # the positions pass half of tiny-smolvlm's 8192 (about frame 130) before the frames fill their
    # budget (about frame 164), so `keep` re-bases several times with a partly filled memory; from
    # then on every frame is compressed or evicted and the kept keys are re-rotated at every step
    # (`reindex`) or whenever positions pass half the range again (`keep`). Questions come along the way.
    cfg = MemoryConfig(budget_tokens=4608, text_budget_tokens=256, policy=policy, positions=positions, store_ram_bytes=2**20)
    session = StreamSession(smol, SessionConfig(system_prompt="Watch.", sampling=SamplingConfig(max_new_tokens=3)), cfg)
    for i, frame in enumerate(_mostly_changing_frames(220, seed=11)):
        session.ingest(frame, 0.5 * i)
        if i % 25 == 24:
            session.ask("What changed?", 0.5 * i)
    answer = session.ask("What did you see first?")
    assert answer.token_ids and answer.evidence
    check_budget(session, cfg)
    assert session.memory.ledger.logical_tokens() > smol.max_positions() // 2  # the positions did pass half the range
    assert session.memory.compactions > 1 and session.stats()["chunks_stored"] > 0  # re-based and evicted, more than once
    session.close()
