"""Snapshots: working memory, store and dialogue survive a restart; bad snapshots are refused."""

from __future__ import annotations

import json

import pytest
import torch

from streamvlm import InputError, MemoryConfig, SamplingConfig, SessionConfig, StreamSession
from streamvlm.engine.check import synthetic_frames

from conftest import load


def streamed(adapter, memory: MemoryConfig | None) -> StreamSession:
    session = StreamSession(adapter, SessionConfig(system_prompt="Watch.", sampling=SamplingConfig(max_new_tokens=5)), memory)
    for i, f in enumerate(synthetic_frames(8, seed=6)):
        session.ingest(f, float(i))
        if i == 3:
            session.ask("What is there?")
    return session


@pytest.mark.parametrize("memory", [None, MemoryConfig(budget_tokens=220, policy="infinipot", store_disk_bytes=10**7)])
def test_the_next_answer_after_load_equals_the_answer_without_restart(adapter, memory, tmp_path):
    original = streamed(adapter, memory)
    original.save(tmp_path / "snap")
    restored = StreamSession.load(adapter, tmp_path / "snap")
    assert restored.stats() == original.stats()
    assert restored.frames == original.frames and restored.last_t == original.last_t
    nxt = synthetic_frames(9, seed=6)[8]
    for session in (original, restored):
        session.ingest(nxt, 8.0)
    a = original.ask_stream("What was first?", return_logits=True)
    b = restored.ask_stream("What was first?", return_logits=True)
    ra, rb = a.result(), b.result()
    assert ra.token_ids == rb.token_ids and ra.evidence == rb.evidence
    assert torch.equal(a.logits, b.logits)
    original.close(), restored.close()


def test_a_snapshot_of_another_model_is_refused(tmp_path):
    streamed(load("tiny-smolvlm"), None).save(tmp_path / "snap")
    with pytest.raises(InputError, match="another model"):
        StreamSession.load(load("tiny-qwen2.5-vl"), tmp_path / "snap")


def test_corrupt_snapshots_are_refused(smol, tmp_path):
    snap = streamed(smol, MemoryConfig(budget_tokens=220)).save(tmp_path / "snap")
    cache = snap / "cache.safetensors"
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cache.safetensors"):
        StreamSession.load(smol, snap)
    cache.write_bytes(data)
    manifest = json.loads((snap / "manifest.json").read_text())
    (snap / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(InputError, match="version"):
        StreamSession.load(smol, snap)
    (snap / "manifest.json").unlink()
    with pytest.raises(InputError, match="not a complete snapshot"):
        StreamSession.load(smol, snap)
