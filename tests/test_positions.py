"""Key re-rotation: moving cached tokens to new positions gives exactly the cache of a run placed there."""

from __future__ import annotations

import pytest
import torch
from conftest import load

from streamvlm.engine import Runner
from streamvlm.engine.check import synthetic_frames
from streamvlm.errors import ConfigError, ModelError
from streamvlm.memory.positions import KeyRotator, shift_positions

SHIFT = 37


def _fill(adapter, start: int) -> tuple[Runner, torch.Tensor]:
    """A runner fed text, one frame and text from position ``start``; returns it and the positions used."""
    runner = Runner(adapter)
    runner.next_position = start
    first = adapter.text_ids("Watch this clip closely.", user=True)
    frame = adapter.prepare_frame(synthetic_frames(1, height=90, width=120, seed=3)[0], 2.0)
    after = adapter.text_ids("and then more text")
    pos = [adapter.position_ids(first, start, [])]
    pos.append(adapter.position_ids(frame.input_ids, pos[-1][1], [frame.grid]))
    pos.append(adapter.position_ids(after, pos[-1][1], []))
    runner.prefill(first)
    runner.prefill(frame.input_ids, grids=[frame.grid], encoded=runner.encode(frame))
    runner.prefill(after)
    positions = torch.cat([p for p, _ in pos], dim=-1)[:, 0]  # [rows, n]
    assert positions.shape[1] == runner.cache_length
    return runner, positions


def _keys(runner: Runner) -> list[torch.Tensor]:
    return [layer.keys for layer in runner.cache.layers]


def test_rotated_cache_matches_a_run_started_later(adapter):
    a, pos_a = _fill(adapter, 0)
    b, pos_b = _fill(adapter, SHIFT)
    assert torch.equal(shift_positions(pos_a, SHIFT), pos_b)
    # Without re-rotation the caches differ: positions are baked into the keys.
    assert max(float((ka - kb).abs().max()) for ka, kb in zip(_keys(a), _keys(b))) > 1e-2

    rot = KeyRotator(adapter.model)
    assert rot.rows == adapter.position_rows
    for layer in a.cache.layers:
        layer.keys = rot.rotate(layer.keys, SHIFT)
    a.next_position = b.next_position
    for ka, kb in zip(_keys(a), _keys(b)):
        assert ka.dtype == kb.dtype and ka.shape == kb.shape
        torch.testing.assert_close(ka, kb, atol=1e-4, rtol=0)

    question = adapter.question_ids("What moved?")
    la = a.prefill(question, all_logits=True)
    lb = b.prefill(question, all_logits=True)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)
    token = int(torch.argmax(la[-1]))
    torch.testing.assert_close(a.decode(token), b.decode(token), atol=1e-4, rtol=0)


def test_unrotate_then_rotate_to_round_trips(adapter):
    runner, positions = _fill(adapter, 5)
    rot = KeyRotator(adapter.model)
    keys = runner.cache.layers[-1].keys
    free = rot.unrotate(keys, positions)
    assert not torch.allclose(free, keys, atol=1e-3)
    torch.testing.assert_close(rot.rotate_to(free, positions), keys, atol=1e-5, rtol=0)
    # Position-free keys placed anywhere equal the cached keys rotated by the difference.
    torch.testing.assert_close(rot.rotate_to(free, shift_positions(positions, 11)), rot.rotate(keys, 11), atol=1e-5, rtol=0)
    # [H, n, D] keys work the same as [B, H, n, D].
    torch.testing.assert_close(rot.unrotate(keys[0], positions), free[0], atol=0, rtol=0)


def test_rotate_there_and_back(adapter):
    runner, _ = _fill(adapter, 0)
    rot = KeyRotator(adapter.model)
    keys = runner.cache.layers[0].keys
    moved = rot.rotate(keys, 123)
    assert not torch.allclose(moved, keys, atol=1e-3)
    torch.testing.assert_close(rot.rotate(moved, -123), keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(rot.rotate(rot.rotate(keys, 20), 30), rot.rotate(keys, 50), atol=1e-5, rtol=0)
    assert rot.rotate(keys, 0) is keys


def test_rotation_keeps_dtype_and_computes_in_float32(adapter):
    rot = KeyRotator(adapter.model)
    keys = torch.randn(1, 2, 6, rot.head_dim, dtype=torch.float32)
    half = rot.rotate(keys.to(torch.bfloat16), 9)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), rot.rotate(keys, 9), atol=3e-2, rtol=2e-2)
    # Rotation preserves each (i, i + D/2) pair's length, so each key's norm.
    torch.testing.assert_close(rot.rotate(keys, 1000).norm(dim=-1), keys.norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_mrope_moves_each_axis_separately(family):
    adapter = load(family)
    runner, positions = _fill(adapter, 0)
    assert positions.shape[0] == 3 and not torch.equal(positions[0], positions[1])  # the frame has 2-D positions
    rot = KeyRotator(adapter.model)
    keys = runner.cache.layers[-1].keys
    free = rot.unrotate(keys, positions)

    delta = (5, -2, 9)
    shifted = shift_positions(positions, delta)
    torch.testing.assert_close(shifted - positions, torch.tensor(delta).view(3, 1).expand_as(positions), atol=0, rtol=0)
    expected = rot.rotate_to(free, shifted)
    torch.testing.assert_close(rot.rotate(keys, delta), expected, atol=1e-5, rtol=0)

    # Independent construction: angles straight from inv_freq and the family's section layout.
    inv = rot.rotary.inv_freq.float()
    section = list(rot.rotary.mrope_section)
    axis = torch.empty(inv.numel(), dtype=torch.long)
    if family == "tiny-qwen2.5-vl":  # contiguous chunks: T, then H, then W
        axis[:] = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    else:  # interleaved T/H/W, H and W on every third frequency up to 3 * their section
        axis[:] = 0
        axis[1 : 3 * section[1] : 3] = 1
        axis[2 : 3 * section[2] : 3] = 2
    angle = torch.tensor(delta, dtype=torch.float32)[axis] * inv
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    half = keys.shape[-1] // 2
    by_hand = keys * cos + torch.cat([-keys[..., half:], keys[..., :half]], dim=-1) * sin
    torch.testing.assert_close(rot.rotate(keys, delta), by_hand, atol=1e-5, rtol=0)

    # Each axis really matters, and an equal tuple is the int.
    assert not torch.allclose(rot.rotate(keys, (5, 0, 0)), rot.rotate(keys, (0, 5, 0)), atol=1e-3)
    assert not torch.allclose(rot.rotate(keys, (0, 5, 0)), rot.rotate(keys, (0, 0, 5)), atol=1e-3)
    torch.testing.assert_close(rot.rotate(keys, (7, 7, 7)), rot.rotate(keys, 7), atol=0, rtol=0)
    assert torch.equal(shift_positions(positions, (7, 7, 7)), shift_positions(positions, 7))


def test_tuple_delta_on_one_dimensional_rope_is_an_error(smol):
    rot = KeyRotator(smol.model)
    assert rot.rows == 1
    keys = torch.randn(1, 2, 4, rot.head_dim)
    with pytest.raises(ConfigError, match="per-axis"):
        rot.rotate(keys, (1, 2, 3))
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        rot.rotate(keys, (1, 1, 1))
    with pytest.raises(ConfigError):
        shift_positions(torch.arange(4).unsqueeze(0), (1, 2, 3))


def test_bad_arguments_are_config_errors(adapter):
    rot = KeyRotator(adapter.model)
    keys = torch.randn(2, 4, rot.head_dim)
    for bad in (1.5, "3", (1, 2), True, None):
        with pytest.raises(ConfigError):
            rot.rotate(keys, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head_dim"):
        rot.rotate(torch.randn(2, 4, rot.head_dim + 2), 1)
    with pytest.raises(ConfigError, match="positions for"):
        rot.unrotate(keys, torch.arange(3).expand(rot.rows, -1))
    with pytest.raises(ConfigError):
        rot.unrotate(keys, torch.zeros(rot.rows, 4))  # float positions
    # [n] positions mean the same number on every axis.
    flat = torch.arange(4)
    torch.testing.assert_close(rot.unrotate(keys, flat), rot.unrotate(keys, flat.expand(rot.rows, -1)), atol=0, rtol=0)


def test_model_without_rotary_module_is_a_model_error():
    with pytest.raises(ModelError, match="rotary"):
        KeyRotator(torch.nn.Linear(4, 4))
    with pytest.raises(ModelError):
        KeyRotator(object())


def test_shift_positions_is_pure():
    pos = torch.tensor([[0, 1, 2], [0, 1, 1], [0, 0, 1]])
    before = pos.clone()
    out = shift_positions(pos, (1, 2, 3))
    assert torch.equal(pos, before)
    assert torch.equal(out, torch.tensor([[1, 2, 3], [2, 3, 3], [3, 3, 4]]))
    assert torch.equal(shift_positions(pos.unsqueeze(1), -1)[:, 0], pos - 1)  # adapter layout [rows, 1, n]
    assert torch.equal(shift_positions(pos.unsqueeze(1), (0, 1, 0))[:, 0], pos + torch.tensor([[0], [1], [0]]))
    with pytest.raises(ConfigError):
        shift_positions(pos.float(), 1)


def _llama_like(rope_parameters: dict) -> torch.nn.Module:
    """A bare module holding a Llama text rotary embedding where a causal LM keeps it (``model.rotary_emb``)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=256, rope_parameters=rope_parameters)
    outer, inner = torch.nn.Module(), torch.nn.Module()
    inner.rotary_emb = LlamaRotaryEmbedding(config)
    outer.model = inner
    return outer


def test_scaled_rope_keeps_its_scaling_out_of_the_shift():
    # YaRN multiplies cos/sin by attention_scaling; a shift must rotate only, not scale again.
    model = _llama_like({"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128})
    rot = KeyRotator(model)
    assert rot.rows == 1 and rot.scaling > 1.0
    free = torch.randn(1, 2, 5, rot.head_dim)
    pos = torch.arange(3, 8).unsqueeze(0)
    cos, sin = model.model.rotary_emb(free, pos)  # what the attention layer applies
    half = rot.head_dim // 2
    cached = free * cos[:, None] + torch.cat([-free[..., half:], free[..., :half]], dim=-1) * sin[:, None]
    torch.testing.assert_close(rot.rotate_to(free, pos), cached, atol=1e-6, rtol=0)
    torch.testing.assert_close(rot.unrotate(cached, pos), free, atol=1e-5, rtol=0)
    torch.testing.assert_close(rot.rotate(cached, 40), rot.rotate_to(free, pos + 40), atol=1e-5, rtol=0)


def test_length_dependent_rope_is_refused():
    with pytest.raises(ModelError, match="dynamic"):
        KeyRotator(_llama_like({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
