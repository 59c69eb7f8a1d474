"""Long-term retrieval at the default depth: chunks indexed by several vectors are found by their best-matching
part (max-sim), near-tied chunks come back earliest first, and both hold in every tier and across save/load."""

from __future__ import annotations

import torch

from streamvlm.memory.manager import INDEX_VECTORS, index_vectors
from streamvlm.memory.store import ChunkRecord, LongTermStore

L, H, D = 1, 1, 4


def _put(store: LongTermStore, chunk_id: int, t: float, index: torch.Tensor) -> None:
    kv = [torch.zeros(H, 1, D)] * L
    store.put(ChunkRecord(chunk_id, "frame", t, t, "cam", chunk_id, chunk_id + 1, 1), kv, kv, index)


def _query(direction: torch.Tensor) -> torch.Tensor:
    return direction.reshape(1, 1, 1, D).expand(L, H, 1, D).clone()


E0, E1 = torch.eye(D)[0], torch.eye(D)[1]


def _vectors(*rows: torch.Tensor) -> torch.Tensor:
    return torch.stack(list(rows)).reshape(L, len(rows), H, D)


def _fill(store: LongTermStore) -> None:
    # Chunk 1 shows the thing in one of its parts only (its mean is weak); chunk 2 is half-alike everywhere
    # (its mean is stronger, its best part weaker); chunks 3-5 are unrelated.
    _put(store, 1, 1.0, _vectors(3 * E0, -E0, -E0, E1))
    _put(store, 2, 2.0, _vectors(E0, E0, E0, E0))
    for i in (3, 4, 5):
        _put(store, i, float(i), _vectors(E1, E1, -E1, E1))


def test_a_chunk_is_found_by_its_best_matching_part(tmp_path) -> None:
    store = LongTermStore(ram_bytes=1 << 20, disk_bytes=0)
    _fill(store)
    assert [cid for cid, _ in store.search(_query(E0), top_k=2)] == [1, 2]
    store.close()


def test_the_same_ranking_from_the_disk_tier_and_after_save_and_load(tmp_path) -> None:
    ram = LongTermStore(ram_bytes=1 << 20, disk_bytes=0)
    disk = LongTermStore(ram_bytes=1, disk_bytes=1 << 20, directory=tmp_path / "spill")  # every chunk spills
    _fill(ram)
    _fill(disk)
    q = _query(E0 + 0.1 * E1)
    expected = ram.search(q, top_k=5)
    assert disk.stats().ram_chunks == 0 and disk.search(q, top_k=5) == expected
    ram.save(tmp_path / "saved")
    loaded = LongTermStore.load(tmp_path / "saved", 1 << 20, 0)
    assert loaded.search(q, top_k=5) == expected
    assert torch.equal(loaded.index_entry(1), ram.index_entry(1)) and loaded.index_entry(1).shape == (L, 4, H, D)
    for s in (ram, disk, loaded):
        s.close()


def test_near_tied_chunks_come_back_earliest_first() -> None:
    """A thing on screen from 3 s to 6 s matches those frames alike; "when did it appear" rests on the first."""
    store = LongTermStore(ram_bytes=1 << 20, disk_bytes=0)
    for i in range(10):
        strength = {3: 2.0, 4: 2.05, 5: 2.1, 6: 2.02}.get(i, 0.0)
        _put(store, i, float(i), _vectors(strength * E0 + E1, E1, E1, E1))
    q = _query(E0)
    assert [cid for cid, _ in store.search(q, top_k=1)] == [5]  # by score alone: the middle frame
    assert [cid for cid, _ in store.search(q, top_k=1, near=1.0)] == [3]
    assert [cid for cid, _ in store.search(q, top_k=5, near=1.0)][:4] == [3, 4, 5, 6]
    store.close()


def test_index_vectors_cover_every_token_in_order() -> None:
    keys = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)  # [kv_heads, tokens, head_dim]
    runs = index_vectors(keys, 5)
    assert runs.shape == (5, 2, 3) and torch.allclose(runs[0], keys[:, :2].mean(dim=1))
    few = index_vectors(keys[:, :3], INDEX_VECTORS)
    assert few.shape == (INDEX_VECTORS, 2, 3)
    assert {tuple(v.flatten().tolist()) for v in few} == {tuple(keys[:, i].flatten().tolist()) for i in range(3)}


def test_a_large_store_still_finds_the_chunk_whose_part_matches() -> None:
    """Past a few hundred chunks a search ranks by each chunk's mean vector first and scores the best candidates
    by their best vector: the chunk with the matching part is still the one found, first."""
    gen = torch.Generator().manual_seed(0)
    store = LongTermStore(ram_bytes=1 << 30, disk_bytes=0)
    for i in range(600):
        noise = 0.3 * torch.randn(4, D, generator=gen)
        noise[:, 0] = noise[:, 0].abs().neg()  # unrelated chunks lean away from the asked direction
        if i == 417:
            noise[0] = 3 * E0  # one part shows the thing
        _put(store, i, float(i), noise.reshape(L, 4, H, D))
    assert store.search(_query(E0), top_k=4, near=1.0)[0][0] == 417
    assert store.search(_query(E0), top_k=4)[0][0] == 417
    store.close()
