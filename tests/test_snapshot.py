"""Snapshots: working memory, store and dialogue survive a restart; bad snapshots are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvlm import ConfigError, InputError, MemoryConfig, SamplingConfig, SessionConfig, StreamSession
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


# ---- damage is refused ---------------------------------------------------------------------------------
BOUNDED = MemoryConfig(budget_tokens=220, policy="infinipot", store_ram_bytes=20_000, store_disk_bytes=10**7)


def _manifest(snap) -> dict:
    return json.loads((snap / "manifest.json").read_text())


def _write_manifest(snap, manifest: dict, *, reseal: bool = False) -> None:
    from streamvlm.memory.store import seal

    (snap / "manifest.json").write_text(json.dumps(seal(manifest) if reseal else manifest))


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _rewrite_cache(snap, change) -> None:
    """Rewrite cache.safetensors through ``change(tensors)`` and record the new file honestly, as a buggy writer would."""
    from safetensors.torch import load_file, save_file

    from streamvlm.memory.store import file_sha256

    tensors = load_file(str(snap / "cache.safetensors"))
    change(tensors)
    save_file(tensors, str(snap / "cache.safetensors"))
    manifest = _manifest(snap)
    manifest["files"]["cache.safetensors"] = {"bytes": (snap / "cache.safetensors").stat().st_size, "sha256": file_sha256(snap / "cache.safetensors")}
    _write_manifest(snap, manifest, reseal=True)


def _edit(change):
    def apply(snap):
        manifest = _manifest(snap)
        change(manifest)
        _write_manifest(snap, manifest)
    return apply


def _stored_chunk_file(snap):
    return sorted((snap / "store").glob("chunk-*.safetensors"))[0]


def _drop_ledger(m):
    del m["ledger"]


def _rebook_stored_chunk_as_dropped(snap):
    manifest = _manifest(snap)
    stored = next(c for c in manifest["ledger"]["chunks"] if c["tier"] == "store")
    stored["tier"] = "dropped"
    _write_manifest(snap, manifest, reseal=True)


DAMAGE = {
    "a flipped byte in the keys": (lambda snap: _flip(snap / "cache.safetensors", (snap / "cache.safetensors").stat().st_size - 100), "cache.safetensors"),
    "a flipped byte in a stored chunk": (lambda snap: _flip(_stored_chunk_file(snap), _stored_chunk_file(snap).stat().st_size - 40), "chunk-"),
    "a truncated stored chunk": (lambda snap: _stored_chunk_file(snap).write_bytes(_stored_chunk_file(snap).read_bytes()[:-9]), "chunk-"),
    "store/ deleted": (lambda snap: shutil.rmtree(snap / "store"), "store"),
    "the store's index deleted": (lambda snap: (snap / "store" / "index.safetensors").unlink(), "store"),
    "next_position -5": (_edit(lambda m: m["runner"].update(next_position=-5)), "next_position"),
    "no ledger": (_edit(_drop_ledger), "ledger"),
    "a manifest []": (lambda snap: (snap / "manifest.json").write_text("[]"), "JSON object"),
    "last_t 'abc'": (_edit(lambda m: m.update(last_t="abc")), "last_t"),
    "last_t before the last frame": (_edit(lambda m: m.update(last_t=1.0)), "last_t"),
    "a manifest that is not JSON": (lambda snap: (snap / "manifest.json").write_text("{'not': json"), "manifest.json"),
    "seen off by one": (_edit(lambda m: m["runner"].update(seen=m["runner"]["seen"] + 1)), "seen"),
    "a chunk of unknown kind": (_edit(lambda m: m["ledger"]["chunks"][1].update(kind="sound")), "kind"),
    "a quietly edited time": (_edit(lambda m: m["ledger"]["chunks"][1].update(t_start=m["ledger"]["chunks"][1]["t_start"] - 0.5)), "checksum"),
    "the old version without checksums": (_edit(lambda m: m.update(version=1)), "version"),
    "an extra tensor": (lambda snap: _rewrite_cache(snap, lambda t: t.update(extra=torch.zeros(2))), "unexpected"),
    "a missing tensor": (lambda snap: _rewrite_cache(snap, lambda t: t.pop("v1")), "missing"),
    "keys of the wrong dtype": (lambda snap: _rewrite_cache(snap, lambda t: t.update(k0=t["k0"].half())), "k0"),
    "keys of the wrong shape": (lambda snap: _rewrite_cache(snap, lambda t: t.update(k1=t["k1"][:, :, 1:].contiguous())), "k1"),
    "a stored chunk the ledger does not book": (_rebook_stored_chunk_as_dropped, "does not book"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_snapshot_is_refused_naming_the_file_and_the_problem(smol, tmp_path, damage):
    session = streamed(smol, BOUNDED)
    assert any(c.tier == "store" for c in session.memory.ledger.all())
    snap = session.save(tmp_path / "snap")
    session.close()
    apply, names = DAMAGE[damage]
    apply(snap)
    with pytest.raises(InputError, match=names) as caught:
        StreamSession.load(smol, snap)
    assert str(snap) in str(caught.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A bounded session's snapshot (cache, store chunks in RAM and on disk) and what it loads as."""
    smol = load("tiny-smolvlm")
    memory = MemoryConfig(budget_tokens=220, policy="window", store_ram_bytes=8_000, store_disk_bytes=10**7)
    session = streamed(smol, memory)
    snap = session.save(tmp_path_factory.mktemp("saved") / "snap")
    session.close()
    reference = StreamSession.load(smol, snap)
    yield snap, _fingerprint(reference)
    reference.close()


def _fingerprint(session: StreamSession):
    from streamvlm.memory import cache as kv

    store = session.memory.store
    chunks = {r.chunk_id: [t.clone() for t in store.get(r.chunk_id)[1] + store.get(r.chunk_id)[2]] for r in store.records()}
    return (session.stats(), session.memory.ledger.to_dict(), session.runner.next_position, session.last_t,
            {k: v.clone() for k, v in kv.layer_tensors(session.runner.cache).items()}, chunks)


def _same(a, b) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(eq(p, q) for p, q in zip(x, y))
        return x == y
    return eq(a, b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_is_refused_or_provably_harmless(saved, tmp_path_factory, data):
    snap, reference = saved
    files = sorted(p.relative_to(snap) for p in snap.rglob("*") if p.is_file())
    assert any(str(f).startswith("store/chunk-") for f in files)
    victim = data.draw(st.sampled_from(files), label="file")
    copy = tmp_path_factory.mktemp("flip") / "snap"
    shutil.copytree(snap, copy)
    size = (copy / victim).stat().st_size
    offset = data.draw(st.integers(0, size - 1), label="offset")
    bits = data.draw(st.integers(1, 255), label="xor")
    raw = bytearray((copy / victim).read_bytes())
    raw[offset] ^= bits
    (copy / victim).write_bytes(bytes(raw))
    try:
        restored = StreamSession.load(load("tiny-smolvlm"), copy)
    except InputError as exc:
        assert str(copy) in str(exc)
        return
    try:  # only a byte the format ignores may load, and then it loads exactly the same session
        assert _same(_fingerprint(restored), reference), f"{victim}@{offset}^{bits} loaded a different session"
    finally:
        restored.close()
        shutil.rmtree(copy.parent, ignore_errors=True)


# ---- saving is atomic ---------------------------------------------------------------------------------
def test_a_failed_save_leaves_the_previous_snapshot_intact(smol, tmp_path, monkeypatch):
    from streamvlm.memory.store import LongTermStore

    first = streamed(smol, BOUNDED)
    snap = first.save(tmp_path / "snap")
    before = _manifest(snap)
    first.ingest(synthetic_frames(9, seed=6)[8], 8.0)

    def broken(self, directory):
        (Path(directory) / "half-written").parent.mkdir(parents=True, exist_ok=True)
        raise OSError("disk full")

    monkeypatch.setattr(LongTermStore, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        first.save(snap)
    monkeypatch.undo()
    assert _manifest(snap) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]  # no staging directory left behind
    restored = StreamSession.load(smol, snap)
    assert restored.last_t == 7.0
    first.save(snap)  # a good save replaces it
    again = StreamSession.load(smol, snap)
    assert again.last_t == 8.0
    for s in (first, restored, again):
        s.close()


def test_save_refuses_a_directory_holding_other_files(smol, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    session = streamed(smol, None)
    with pytest.raises(ConfigError, match="notes.txt"):
        session.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    session.close()
