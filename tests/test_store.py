"""Long-term store: quotas, spill and drop order, tier round trips, retrieval scoring, save/load, close."""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvlm.errors import ConfigError, InputError, StreamVLMError
from streamvlm.memory.store import ChunkRecord, LongTermStore, StoreEvent, sweep_stale_directories

LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 2, 2, 8, 4
CHUNK_BYTES = 2 * LAYERS * KV_HEADS * TOKENS * HEAD_DIM * 4  # keys + values, float32


def make_chunk(
    chunk_id: int,
    t_end: float | None = None,
    *,
    tokens: int = TOKENS,
    layers: int = LAYERS,
    kv_heads: int = KV_HEADS,
    head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.float32,
    index: torch.Tensor | None = None,
) -> tuple[ChunkRecord, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """A chunk with seeded random KV; its index is the mean key unless one is given."""
    t_end = float(chunk_id) + 1.0 if t_end is None else t_end
    record = ChunkRecord(chunk_id, "frame", t_end - 0.5, t_end, "cam0", chunk_id * 10, chunk_id * 10 + tokens, tokens)
    g = torch.Generator().manual_seed(1000 + chunk_id)
    keys = [torch.randn(kv_heads, tokens, head_dim, generator=g).to(dtype) for _ in range(layers)]
    values = [torch.randn(kv_heads, tokens, head_dim, generator=g).to(dtype) for _ in range(layers)]
    if index is None:
        index = torch.stack([k.float().mean(dim=1) if tokens else torch.zeros(kv_heads, head_dim) for k in keys])
    return record, keys, values, index


def put(store: LongTermStore, chunk_id: int, t_end: float | None = None, **kw) -> list[StoreEvent]:
    return store.put(*make_chunk(chunk_id, t_end, **kw))


def kinds(events: list[StoreEvent]) -> list[tuple[str, int]]:
    return [(e.kind, e.chunk_id) for e in events]


# ----------------------------------------------------------------------------------------- records


def test_record_round_trips_through_json() -> None:
    record = ChunkRecord(3, "text", 1, 2.5, "mic", 40, 52, 12)
    again = ChunkRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and isinstance(again.t_start, float)


@pytest.mark.parametrize(
    "change",
    [{"kind": "audio"}, {"t_end": 0.0}, {"t_start": math.nan}, {"tokens": -1}, {"position_end": 0}, {"chunk_id": "3"}],
)
def test_bad_record_raises_input_error(change: dict) -> None:
    fields = dict(
        chunk_id=3, kind="frame", t_start=1.0, t_end=2.0, source_id="cam", position_start=5, position_end=9, tokens=4
    )
    with pytest.raises(InputError):
        ChunkRecord(**{**fields, **change})
    with pytest.raises(InputError, match="missing"):
        ChunkRecord.from_dict({k: v for k, v in fields.items() if k != "tokens"})


# ------------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("ram, disk", [(-1, 0), (0, -1), (1.5, 0), (True, 0), ("10", 0), (0, None)])
def test_bad_quotas_raise_config_error(ram, disk) -> None:
    with pytest.raises(ConfigError):
        LongTermStore(ram, disk)


def test_owned_temp_dir_is_removed_on_close_and_store_refuses_use() -> None:
    with LongTermStore(0, 10 * CHUNK_BYTES) as store:
        directory = store.directory
        assert directory is not None and directory.name.startswith("streamvlm-store-")
        put(store, 0)
        assert store.where(0) == "disk" and any(directory.iterdir())
    assert store.closed and not directory.exists()
    store.close()  # idempotent
    with pytest.raises(StreamVLMError, match="closed"):
        put(store, 1)
    with pytest.raises(StreamVLMError, match="closed"):
        store.get(0)


def test_forgotten_store_removes_its_temp_dir_when_collected() -> None:
    store = LongTermStore(0, 10 * CHUNK_BYTES)
    put(store, 0)
    directory = store.directory
    del store
    gc.collect()
    assert directory is not None and not directory.exists()


def test_user_directory_survives_close_with_only_spill_files_removed(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    store = LongTermStore(0, 10 * CHUNK_BYTES, tmp_path)
    put(store, 0)
    put(store, 1)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_ram_only_store_makes_no_directory() -> None:
    store = LongTermStore(10 * CHUNK_BYTES, 0)
    assert store.directory is None
    put(store, 0)
    assert store.where(0) == "ram"


# ------------------------------------------------------------------------------------ spill & drop


def test_spill_moves_oldest_ram_chunk_first() -> None:
    with LongTermStore(2 * CHUNK_BYTES, 10 * CHUNK_BYTES) as store:
        assert kinds(put(store, 0, 5.0)) == [("stored", 0)]
        assert kinds(put(store, 1, 3.0)) == [("stored", 1)]
        # Chunk 1 ends earliest, so it leaves RAM first even though chunk 0 came in first.
        assert kinds(put(store, 2, 6.0)) == [("stored", 2), ("spilled", 1)]
        assert kinds(put(store, 3, 7.0)) == [("stored", 3), ("spilled", 0)]
        # A chunk older than everything in RAM is stored and spilled at once.
        assert kinds(put(store, 4, 1.0)) == [("stored", 4), ("spilled", 4)]
        assert [r.chunk_id for r in store.records()] == [4, 1, 0, 2, 3]
        assert {c: store.where(c) for c in range(5)} == {0: "disk", 1: "disk", 2: "ram", 3: "ram", 4: "disk"}
        # Equal t_end: the smaller chunk_id counts as older.
        assert kinds(put(store, 6, 7.0)) == [("stored", 6), ("spilled", 2)]
        assert kinds(put(store, 5, 7.0)) == [("stored", 5), ("spilled", 3)]


def test_drops_are_reported_with_dropped_up_to_s() -> None:
    with LongTermStore(CHUNK_BYTES, 2 * CHUNK_BYTES) as store:
        for cid in range(3):
            put(store, cid)
        events = put(store, 3)
        assert kinds(events) == [("stored", 3), ("spilled", 2), ("dropped", 0)]
        assert events[-1] == StoreEvent("dropped", 0, 1.0, CHUNK_BYTES)
        put(store, 4)
        s = store.stats()
        assert (s.dropped_chunks, s.dropped_bytes, s.dropped_up_to_s) == (2, 2 * CHUNK_BYTES, 2.0)
        assert (s.ram_chunks, s.disk_chunks, s.ram_bytes, s.disk_bytes) == (1, 2, CHUNK_BYTES, 2 * CHUNK_BYTES)
        assert 0 not in store and len(store) == 3
        with pytest.raises(KeyError, match="not in the long-term store"):
            store.get(0)
        spills = sorted(p.name for p in store.directory.glob("*.safetensors"))
        assert spills == sorted(f"spill-{store._tag}-{c}.safetensors" for c in (2, 3))
        assert len(list(store.directory.glob("spill-*"))) == 3  # and the disk tier's index file


def test_oversized_chunks_go_straight_to_disk_or_are_dropped() -> None:
    with LongTermStore(CHUNK_BYTES, 3 * CHUNK_BYTES) as store:
        put(store, 0)
        assert kinds(put(store, 1, tokens=2 * TOKENS)) == [("spilled", 1)]
        assert store.where(0) == "ram" and store.where(1) == "disk"
        assert kinds(put(store, 2, tokens=4 * TOKENS)) == [("dropped", 2)]
        assert store.stats().dropped_up_to_s == 3.0 and 2 not in store


def test_ram_victim_larger_than_disk_quota_is_dropped_not_written() -> None:
    with LongTermStore(3 * CHUNK_BYTES, CHUNK_BYTES) as store:
        put(store, 0, tokens=2 * TOKENS)
        assert kinds(put(store, 1, tokens=2 * TOKENS)) == [("stored", 1), ("dropped", 0)]
        assert store.stats().disk_chunks == 0 and not any(store.directory.glob("spill-*"))


@settings(max_examples=40, deadline=None)
@given(
    ram_quota=st.integers(0, 40),
    disk_quota=st.integers(0, 40),
    chunks=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 20)), min_size=1, max_size=12),
)
def test_quotas_hold_after_every_put(ram_quota: int, disk_quota: int, chunks: list[tuple[int, int]]) -> None:
    unit = 2 * 4 * 4  # one token of keys + values: 1 layer, 1 kv head, head_dim 4, float32
    with LongTermStore(ram_quota * unit, disk_quota * unit) as store:
        dropped: set[int] = set()
        for cid, (tokens, t_end) in enumerate(chunks):
            before = {c: store.where(c) for c in (r.chunk_id for r in store.records())}
            events = put(store, cid, float(t_end), tokens=tokens, layers=1, kv_heads=1, head_dim=4)
            s = store.stats()
            assert s.ram_bytes <= s.ram_quota and s.disk_bytes <= s.disk_quota
            assert s.ram_chunks + s.disk_chunks == len(store)
            assert s.ram_bytes == sum(unit * r.tokens for r in store.records() if store.where(r.chunk_id) == "ram")
            assert s.disk_bytes == sum(unit * r.tokens for r in store.records() if store.where(r.chunk_id) == "disk")
            if store.directory is not None:
                assert len(list(store.directory.glob("*.safetensors"))) == s.disk_chunks
            dropped |= {e.chunk_id for e in events if e.kind == "dropped"}
            assert dropped.isdisjoint(r.chunk_id for r in store.records())
            assert dropped | {r.chunk_id for r in store.records()} == set(range(cid + 1))
            assert s.dropped_chunks == len(dropped)
            _assert_oldest_moved_first(store, events, before)


def _assert_oldest_moved_first(store: LongTermStore, events: list[StoreEvent], before: dict[int, str]) -> None:
    """Every chunk spilled from RAM or dropped from disk is older than all that stayed in that tier."""
    held = store.records()
    ram_keys = [(r.t_end, r.chunk_id) for r in held if store.where(r.chunk_id) == "ram"]
    disk_keys = [(r.t_end, r.chunk_id) for r in held if store.where(r.chunk_id) == "disk"]
    stored = {e.chunk_id for e in events if e.kind == "stored"}
    for e in events:
        key = (e.t_end, e.chunk_id)
        if e.kind == "spilled" and (e.chunk_id in stored or before.get(e.chunk_id) == "ram"):
            assert all(key < k for k in ram_keys)
        if e.kind == "dropped" and before.get(e.chunk_id) == "disk":
            assert all(key < k for k in disk_keys)


# ---------------------------------------------------------------------------------------- get


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_get_from_ram_and_disk_returns_identical_tensors(dtype: torch.dtype) -> None:
    size = CHUNK_BYTES * dtype.itemsize // 4
    with LongTermStore(size, 4 * size) as store:
        record, keys, values, index = make_chunk(0, dtype=dtype)
        store.put(record, keys, values, index)
        got_record, got_keys, got_values = store.get(0)
        assert got_record == record
        for want, got in zip(keys + values, got_keys + got_values):
            assert got.dtype == dtype and torch.equal(want, got)
        got_keys[0].zero_()  # the caller's copy; the store is unaffected
        put(store, 1, dtype=dtype)
        assert store.where(0) == "disk"
        _, disk_keys, disk_values = store.get(0)
        for want, got in zip(keys + values, disk_keys + disk_values):
            assert got.dtype == dtype and torch.equal(want, got)
        assert store.where(0) == "disk"


def test_put_copies_the_callers_tensors() -> None:
    with LongTermStore(10 * CHUNK_BYTES, 0) as store:
        record, keys, values, index = make_chunk(0)
        expected = keys[0].clone()
        store.put(record, keys, values, index)
        keys[0].zero_()
        assert torch.equal(store.get(0)[1][0], expected)


def test_bad_input_raises_and_changes_nothing() -> None:
    with LongTermStore(10 * CHUNK_BYTES, 0) as store:
        put(store, 0)
        record, keys, values, index = make_chunk(1)
        with pytest.raises(InputError, match="already in the store"):
            store.put(make_chunk(0)[0], keys, values, index)
        with pytest.raises(InputError, match="tokens"):
            store.put(record, [k[:, :2] for k in keys], values, index)
        with pytest.raises(InputError, match="index"):
            store.put(record, keys, values, index[:, :1])
        with pytest.raises(InputError, match="float"):
            store.put(record, [k.to(torch.int32) for k in keys], values, index)
        with pytest.raises(InputError, match="differs from the stored"):
            store.put(*make_chunk(2, layers=3))
        assert len(store) == 1 and store.stats().ram_bytes == CHUNK_BYTES


def test_stats_report_index_bytes_outside_quota() -> None:
    with LongTermStore(CHUNK_BYTES, 0) as store:
        put(store, 0)
        assert store.stats().index_bytes == LAYERS * KV_HEADS * HEAD_DIM * 4
        assert store.stats().ram_bytes == CHUNK_BYTES


# -------------------------------------------------------------------------------------- search


def _directions(layers: int, kv_heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(layers, kv_heads, head_dim, generator=g)
    return u / u.norm(dim=-1, keepdim=True)


def _noise_index(chunk_id: int, layers: int = 3, kv_heads: int = 2, head_dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(chunk_id)
    return 0.3 * torch.randn(layers, kv_heads, head_dim, generator=g)


def _planted_store(planted: dict[int, float], n: int = 20) -> tuple[LongTermStore, torch.Tensor]:
    layers, kv_heads, head_dim = 3, 2, 16
    u = _directions(layers, kv_heads, head_dim)
    store = LongTermStore(100 * CHUNK_BYTES, 0)
    for cid in range(n):
        index = planted[cid] * u if cid in planted else _noise_index(cid)
        store.put(*make_chunk(cid, layers=layers, kv_heads=kv_heads, head_dim=head_dim, index=index))
    return store, u


def _queries(u: torch.Tensor, q_heads: int, n_q: int = 3) -> torch.Tensor:
    """Queries whose head h points along kv head h // group's direction, in every layer."""
    group = q_heads // u.shape[1]
    q = u.repeat_interleave(group, dim=1)  # [layers, q_heads, head_dim]
    return q.unsqueeze(2).expand(-1, -1, n_q, -1).clone()


def test_search_ranks_the_planted_chunk_first() -> None:
    store, u = _planted_store({7: 2.0})
    hits = store.search(_queries(u, q_heads=4), top_k=3)
    assert hits[0][0] == 7 and len(hits) == 3
    assert hits[0][1] > hits[1][1] >= hits[2][1]


def test_search_returns_two_planted_chunks_in_order() -> None:
    store, u = _planted_store({7: 2.0, 12: 1.5})
    assert [cid for cid, _ in store.search(_queries(u, q_heads=4), top_k=2)] == [7, 12]


def test_search_uses_grouped_query_head_mapping() -> None:
    layers, kv_heads, head_dim, q_heads = 2, 2, 8, 4
    u = _directions(layers, 1, head_dim, seed=3)[:, 0]  # [layers, head_dim]
    store = LongTermStore(100 * CHUNK_BYTES, 0)
    for cid, kv_head in ((0, 0), (1, 1)):
        index = torch.zeros(layers, kv_heads, head_dim)
        index[:, kv_head] = u
        store.put(*make_chunk(cid, layers=layers, kv_heads=kv_heads, head_dim=head_dim, index=index))
    blank = torch.zeros(layers, kv_heads, head_dim)
    store.put(*make_chunk(2, layers=layers, kv_heads=kv_heads, head_dim=head_dim, index=blank))
    queries = torch.zeros(layers, q_heads, 2, head_dim)
    queries[:, 2:] = u[:, None, None, :]  # query heads 2 and 3 form group 1 -> kv head 1
    assert store.search(queries, top_k=1)[0][0] == 1
    queries = torch.zeros(layers, q_heads, 2, head_dim)
    queries[:, :2] = u[:, None, None, :]  # heads 0 and 1 -> kv head 0
    assert store.search(queries, top_k=1)[0][0] == 0


def _reference_scores(indexes: dict[int, torch.Tensor], queries: torch.Tensor) -> dict[int, float]:
    """The documented formula, written out with loops, over the given chunks' index entries."""
    ids = sorted(indexes)
    layers, q_heads, n_q, head_dim = queries.shape
    per_layer = {}
    for cid in ids:
        index = indexes[cid]
        group = q_heads // index.shape[1]
        per_layer[cid] = [
            sum(float(queries[l, h, t] @ index[l, h // group]) for h in range(q_heads) for t in range(n_q))
            / (q_heads * n_q * math.sqrt(head_dim))
            for l in range(layers)
        ]
    if len(ids) == 1:
        return {ids[0]: sum(per_layer[ids[0]]) / layers}
    out = {cid: 0.0 for cid in ids}
    for l in range(layers):
        col = [per_layer[cid][l] for cid in ids]
        mean = sum(col) / len(col)
        std = math.sqrt(sum((x - mean) ** 2 for x in col) / len(col))
        for cid, x in zip(ids, col):
            out[cid] += (x - mean) / std / layers
    return out


@pytest.mark.parametrize("n", [1, 5])
def test_search_scores_match_documented_formula(n: int) -> None:
    store = LongTermStore(100 * CHUNK_BYTES, 0)
    for cid in range(n):
        store.put(*make_chunk(cid, layers=3, kv_heads=2, head_dim=16, index=_noise_index(cid)))
    queries = torch.randn(3, 6, 4, 16, generator=torch.Generator().manual_seed(9))
    want = _reference_scores({cid: _noise_index(cid) for cid in range(n)}, queries)
    got = dict(store.search(queries, top_k=10))
    assert got.keys() == want.keys()
    for cid in want:
        assert got[cid] == pytest.approx(want[cid], rel=1e-4, abs=1e-5)


TIERED_BYTES = 2 * 3 * 2 * TOKENS * 16 * 4  # one chunk of make_chunk(layers=3, kv_heads=2, head_dim=16)


def _tiered_store(ids: range, ram_chunks: int, disk_chunks: int, directory: Path | None = None) -> LongTermStore:
    store = LongTermStore(ram_chunks * TIERED_BYTES, disk_chunks * TIERED_BYTES, directory)
    for cid in ids:
        store.put(*make_chunk(cid, layers=3, kv_heads=2, head_dim=16, index=_noise_index(cid)))
    return store


@pytest.mark.parametrize("block_bytes", [None, 3 * 3 * 2 * 16 * 4])  # default, or 3 entries per read
def test_search_over_both_tiers_matches_formula_and_an_all_ram_store(block_bytes: int | None, monkeypatch) -> None:
    import streamvlm.memory.store as store_module

    if block_bytes is not None:
        monkeypatch.setattr(store_module, "_INDEX_BLOCK_BYTES", block_bytes)
    # 40 chunks through 2 in RAM and 30 on disk: 8 dropped, so disk-index slots are freed and reused.
    with _tiered_store(range(40), ram_chunks=2, disk_chunks=30) as tiered, _tiered_store(range(8, 40), 100, 0) as flat:
        s = tiered.stats()
        assert (s.ram_chunks, s.disk_chunks, s.dropped_chunks) == (2, 30, 8)
        held = sorted(r.chunk_id for r in tiered.records())
        assert held == list(range(8, 40))
        for cid in held:
            assert torch.equal(tiered.index_entry(cid), _noise_index(cid))
        queries = torch.randn(3, 6, 4, 16, generator=torch.Generator().manual_seed(9))
        want = _reference_scores({cid: _noise_index(cid) for cid in held}, queries)
        got = tiered.search(queries, top_k=100)
        assert [cid for cid, _ in got] == sorted(want, key=lambda c: (-want[c], c))
        for cid, score in got:
            assert score == pytest.approx(want[cid], rel=1e-4, abs=1e-5)
        # The same chunks held all in RAM rank the same, with the same scores.
        flat_hits = flat.search(queries, top_k=100)
        assert [cid for cid, _ in flat_hits] == [cid for cid, _ in got]
        assert [score for _, score in flat_hits] == pytest.approx([score for _, score in got], rel=1e-5, abs=1e-6)


def test_disk_tier_index_entries_live_in_a_file_not_in_ram(tmp_path: Path) -> None:
    with _tiered_store(range(12), ram_chunks=2, disk_chunks=100, directory=tmp_path) as store:
        row_bytes = 3 * 2 * 16 * 4
        s = store.stats()
        assert (s.ram_chunks, s.disk_chunks) == (2, 10)
        assert (s.index_bytes, s.index_ram_bytes) == (12 * row_bytes, 2 * row_bytes)
        (index_file,) = tmp_path.glob(f"spill-{store._tag}-index.f32")
        assert index_file.stat().st_size == 10 * row_bytes
        assert len(store._ram_index) == 2
        # A search reads the disk tier's entries from the file: plant a strong entry there for chunk 4 ...
        u = _directions(3, 2, 16)
        queries = _queries(u, q_heads=4)
        assert store.search(queries, top_k=1)[0][0] != 4
        slot = store._disk.slot(store._disk.find(4))
        with open(index_file, "r+b") as f:
            f.seek(slot * row_bytes)
            f.write((5.0 * u).numpy().tobytes())
        # ... and the search finds it.
        assert store.search(queries, top_k=1)[0][0] == 4
        assert torch.equal(store.index_entry(4), 5.0 * u)
    assert not index_file.exists()


def test_ram_per_disk_chunk_stays_small(tmp_path: Path) -> None:
    """The store's own bookkeeping for a chunk on disk is a numpy row, not Python objects per chunk."""
    import tracemalloc

    big_index = dict(layers=8, kv_heads=4, head_dim=64, tokens=1)  # an 8 KiB index entry per chunk
    with LongTermStore(0, 1 << 40, tmp_path) as store:
        for cid in range(200):
            store.put(*make_chunk(cid, **big_index))
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for cid in range(200, 1200):
                store.put(*make_chunk(cid, **big_index))
            gc.collect()
            grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename"))
        finally:
            tracemalloc.stop()
        assert store.stats().disk_chunks == 1200 and store.stats().index_ram_bytes == 0
        assert grown / 1000 < 400, f"{grown / 1000:.0f} bytes of Python/numpy memory per disk chunk"


def test_search_edge_cases_and_cache_invalidation() -> None:
    with LongTermStore(3 * CHUNK_BYTES, 0) as store:
        assert store.search(torch.zeros(LAYERS, 4, 1, HEAD_DIM), top_k=5) == []
        for cid in range(3):
            put(store, cid)
        q = torch.randn(LAYERS, 4, 2, HEAD_DIM)
        assert store.search(q, top_k=0) == []
        assert len(store.search(q, top_k=10)) == 3
        with pytest.raises(ConfigError):
            store.search(q, top_k=-1)
        bad_shapes = [(LAYERS, 3, 1, HEAD_DIM), (LAYERS + 1, 4, 1, HEAD_DIM), (LAYERS, 4, 0, HEAD_DIM)]
        for shape in bad_shapes:
            with pytest.raises(InputError):
                store.search(torch.zeros(shape), top_k=1)
        planted = 10 * torch.ones(LAYERS, KV_HEADS, HEAD_DIM)
        put(store, 3, index=planted)  # drops chunk 0 (no disk tier)
        hits = store.search(torch.ones(LAYERS, 4, 1, HEAD_DIM), top_k=10)
        assert hits[0][0] == 3 and {cid for cid, _ in hits} == {1, 2, 3}


# ---------------------------------------------------------------------------------- save & load


def _filled_store(directory: Path | None = None) -> LongTermStore:
    store = LongTermStore(2 * CHUNK_BYTES, 3 * CHUNK_BYTES, directory)
    for cid in range(6):
        put(store, cid, dtype=torch.float16 if cid % 2 else torch.float32)
    return store


def test_save_load_round_trip(tmp_path: Path) -> None:
    store = _filled_store()
    saved = store.save(tmp_path / "snap")
    loaded = LongTermStore.load(saved, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES)
    try:
        assert loaded.records() == store.records()
        assert loaded.stats() == store.stats()
        assert [loaded.where(c) for c in range(6)] == [store.where(c) for c in range(6)]
        for record in store.records():
            want, got = store.get(record.chunk_id), loaded.get(record.chunk_id)
            assert got[0] == want[0]
            for a, b in zip(want[1] + want[2], got[1] + got[2]):
                assert a.dtype == b.dtype and torch.equal(a, b)
        q = torch.randn(LAYERS, 4, 2, HEAD_DIM, generator=torch.Generator().manual_seed(1))
        assert loaded.search(q, 5) == store.search(q, 5)
        store.close()
        assert (saved / "manifest.json").exists() and loaded.get(5)[0].chunk_id == 5
    finally:
        loaded.close()
    assert (saved / "manifest.json").exists()


def test_save_load_keeps_the_disk_tier_and_its_index(tmp_path: Path) -> None:
    with _tiered_store(range(40), ram_chunks=2, disk_chunks=30) as store:
        saved = store.save(tmp_path / "snap")
        with LongTermStore.load(saved, 2 * TIERED_BYTES, 30 * TIERED_BYTES) as loaded:
            assert loaded.records() == store.records() and loaded.stats() == store.stats()
            assert [loaded.where(r.chunk_id) for r in loaded.records()] == [store.where(r.chunk_id) for r in store.records()]
            for record in store.records():
                assert torch.equal(loaded.index_entry(record.chunk_id), _noise_index(record.chunk_id))
            queries = torch.randn(3, 6, 4, 16, generator=torch.Generator().manual_seed(4))
            assert loaded.search(queries, 10) == store.search(queries, 10)
            # The loaded store goes on as the original would: the next put spills and drops the same chunks.
            want = store.put(*make_chunk(40, layers=3, kv_heads=2, head_dim=16, index=_noise_index(40)))
            got = loaded.put(*make_chunk(40, layers=3, kv_heads=2, head_dim=16, index=_noise_index(40)))
            assert kinds(got) == kinds(want) == [("stored", 40), ("spilled", 38), ("dropped", 8)]


def test_load_under_smaller_quotas_reports_drops(tmp_path: Path) -> None:
    with _filled_store() as store:
        saved = store.save(tmp_path / "snap")
    with LongTermStore.load(saved, CHUNK_BYTES, CHUNK_BYTES) as loaded:
        # Newest first: 5 (half size, fp16) fills half of RAM, 4 does not fit the rest and goes to disk,
        # 3 (fp16) fills RAM, and the older ones fit nowhere.
        assert [r.chunk_id for r in loaded.records()] == [3, 4, 5]
        assert [loaded.where(c) for c in (3, 4, 5)] == ["ram", "disk", "ram"]
        assert [(e.kind, e.chunk_id) for e in loaded.load_events] == [("dropped", 2), ("dropped", 1), ("dropped", 0)]
        s = loaded.stats()
        assert (s.dropped_chunks, s.dropped_up_to_s) == (3, 3.0)
        assert s.ram_bytes <= s.ram_quota and s.disk_bytes <= s.disk_quota


def test_resave_removes_stale_chunk_files(tmp_path: Path) -> None:
    with _filled_store() as store:
        store.save(tmp_path)
        put(store, 6)
        store.save(tmp_path)
        held = {f"chunk-{r.chunk_id}.safetensors" for r in store.records()}
    assert {p.name for p in tmp_path.glob("chunk-*")} == held


def test_save_into_own_temp_dir_is_refused() -> None:
    with _filled_store() as store:
        with pytest.raises(ConfigError):
            store.save(store.directory)


def test_missing_or_corrupt_manifest_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest.json"):
        LongTermStore.load(tmp_path, CHUNK_BYTES, CHUNK_BYTES)
    with _filled_store() as store:
        store.save(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "streamvlm.longterm-store", "vers')
    with pytest.raises(InputError, match="manifest.json"):
        LongTermStore.load(tmp_path, CHUNK_BYTES, CHUNK_BYTES)


@pytest.mark.parametrize("victim", ["chunk-5.safetensors", "chunk-2.safetensors", "index.safetensors"])
def test_truncated_safetensors_raises_input_error_naming_it(tmp_path: Path, victim: str) -> None:
    with _filled_store() as store:
        store.save(tmp_path)
    data = (tmp_path / victim).read_bytes()
    (tmp_path / victim).write_bytes(data[: len(data) - 7])
    with pytest.raises(InputError, match=victim):
        LongTermStore.load(tmp_path, 10 * CHUNK_BYTES, 10 * CHUNK_BYTES)


def test_a_new_store_removes_temporary_directories_of_dead_processes(tmp_path: Path, monkeypatch) -> None:
    import socket
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    host = socket.gethostname()
    owners = {"dead": f"{host} {dead_pid}", "alive": f"{host} {os.getpid()}", "elsewhere": f"other-host {dead_pid}", "unowned": None}
    for name, owner in owners.items():
        path = tmp_path / f"streamvlm-store-{name}"
        path.mkdir()
        (path / "spill-x-0.safetensors").write_bytes(b"kv")
        if owner is not None:
            (path / "owner").write_text(owner)
    (tmp_path / "unrelated-dir").mkdir()
    with LongTermStore(CHUNK_BYTES, 4 * CHUNK_BYTES) as store:
        mine = store.directory
        assert mine.parent == tmp_path and (mine / "owner").read_text().split() == [host, str(os.getpid())]
        left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["streamvlm-store-alive", "streamvlm-store-elsewhere", "streamvlm-store-unowned", "unrelated-dir", mine.name])
    assert not mine.exists()  # closed: its own directory is gone too
    assert sweep_stale_directories(tmp_path) == []  # nothing stale is left


@pytest.mark.parametrize("victim", ["chunk-5.safetensors", "chunk-1.safetensors", "index.safetensors"])
def test_a_flipped_byte_in_saved_tensors_is_refused_naming_the_file(tmp_path: Path, victim: str) -> None:
    with _filled_store() as store:
        store.save(tmp_path)
    data = bytearray((tmp_path / victim).read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data: the file still parses, the numbers differ
    (tmp_path / victim).write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{victim} is damaged"):
        LongTermStore.load(tmp_path, 10 * CHUNK_BYTES, 10 * CHUNK_BYTES)


def test_an_edited_store_manifest_is_refused(tmp_path: Path) -> None:
    with _filled_store() as store:
        store.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["dropped_chunks"] += 1  # well-formed, but not what was saved
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="manifest.json is damaged or was edited"):
        LongTermStore.load(tmp_path, 10 * CHUNK_BYTES, 10 * CHUNK_BYTES)
