"""Moving cached tokens to new positions: keys are re-rotated, never just renumbered.

A transformer with rotary position embeddings (RoPE) stores every key in the KV cache *after* its
rotation: the cache holds ``RoPE(p) · k`` for a token at position ``p``, not ``k``. The position is
baked into the key's numbers. Editing the cache (evicting tokens and closing the gap, moving a segment
back from long-term memory, restarting the numbering) therefore has two halves that must go together:

* the position bookkeeping (what position the next token takes, which positions a segment holds), and
* the keys already in the cache, which still say where they used to be.

Renumbering positions without re-rotating the keys leaves the cache lying about where its tokens are:
new queries see old keys at the old distances, attention is silently wrong, and nothing fails loudly.
This module does the second half. Rotations compose, ``RoPE(p)`` followed by a rotation by ``d`` is
``RoPE(p + d)``, so :meth:`KeyRotator.rotate` moves keys by ``d`` without knowing ``p``, and the result
equals what the model would have cached had the tokens been at ``p + d`` from the start, exactly up to
float rounding (about ``1e-6`` relative in float32 for positions in the thousands). Values carry no
position and never need touching. Use :func:`shift_positions` for the bookkeeping half, with the same
``delta``.

Multimodal RoPE (Qwen2.5-VL, Qwen3-VL) numbers each token on three axes, temporal, height and width,
and gives each axis its own slice of the rotary frequencies. A ``delta`` is then either one integer
(every axis moves by the same amount: what a plain shift along the stream is) or a 3-tuple
``(dt, dh, dw)`` moving each axis separately. Models with 1-D RoPE (SmolVLM/Llama) take integers only.

The frequencies and their layout come from the model's own text rotary module, so the rotation is
the one the model applies. RoPE variants whose frequencies change with the sequence length
(``dynamic`` NTK scaling, ``longrope``) cannot be re-rotated exactly and are refused.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError

__all__ = ["Delta", "KeyRotator", "shift_positions"]

Delta = int | tuple[int, int, int]
"""How far to move: one int for every axis, or ``(temporal, height, width)`` for multimodal RoPE."""

# Where transformers 5.x keeps the language model's rotary module inside a ``...ForConditionalGeneration``.
_ROTARY_PATHS = (
    "model.language_model.rotary_emb",  # Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    "model.text_model.rotary_emb",  # SmolVLM, Idefics3
    "language_model.rotary_emb",
    "text_model.rotary_emb",
    "model.rotary_emb",  # plain causal LMs
    "rotary_emb",
)
# RoPE types whose frequencies depend on how long the sequence is: a later rotation would not match.
_POSITION_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def _normalize_delta(delta: Any, rows: int | None) -> tuple[int, ...]:
    """``delta`` as one int per position row (``rows`` of them; ``None``: whatever the delta implies)."""
    if isinstance(delta, bool):
        raise ConfigError(f"delta must be an int or a 3-tuple of ints, got {delta!r}")
    if isinstance(delta, (tuple, list)):
        if len(delta) != 3:
            raise ConfigError(f"a per-axis delta needs 3 ints (temporal, height, width), got {len(delta)}: {delta!r}")
        if rows is not None and rows != 3:
            raise ConfigError(
                f"a per-axis delta {tuple(delta)!r} needs multimodal (3-row) RoPE positions; this model has "
                f"{rows}-row positions, so give one int"
            )
        try:
            parts = tuple(operator.index(d) for d in delta)
        except TypeError:
            raise ConfigError(f"delta entries must be ints, got {delta!r}") from None
        if any(isinstance(d, bool) for d in delta):
            raise ConfigError(f"delta entries must be ints, got {delta!r}")
        return parts
    try:
        d = operator.index(delta)
    except TypeError:
        raise ConfigError(f"delta must be an int or a 3-tuple of ints, got {type(delta).__name__}: {delta!r}") from None
    return (d,) * (rows if rows is not None else 1)


def shift_positions(positions: torch.Tensor, delta: Delta) -> torch.Tensor:
    """Return ``positions`` moved by ``delta``, the bookkeeping twin of :meth:`KeyRotator.rotate`.

    ``positions`` is a LongTensor whose first dimension is the position row (``[rows, n]``, or the
    adapter's ``[rows, 1, n]``). An int adds to every row; a 3-tuple ``(dt, dh, dw)`` adds to the
    temporal, height and width rows respectively and needs ``rows == 3`` (else :class:`ConfigError`).
    The input is not modified. Results may be negative; keeping positions usable is the caller's job.
    Never apply this to positions of cached tokens without also re-rotating their keys by the same delta.
    """
    if not isinstance(positions, torch.Tensor) or positions.dim() < 1:
        raise ConfigError("positions must be a tensor shaped [rows, ...]")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise ConfigError(f"positions must be an integer tensor, got {positions.dtype}")
    per_row = _normalize_delta(delta, None)
    if len(per_row) == 3 and positions.shape[0] != 3:
        raise ConfigError(f"a per-axis delta needs positions with 3 rows, got {positions.shape[0]}")
    if len(per_row) == 1:
        return positions + per_row[0]
    offsets = torch.tensor(per_row, dtype=positions.dtype, device=positions.device)
    return positions + offsets.view(3, *([1] * (positions.dim() - 1)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Same convention as transformers' rotate_half for these families: halves, not interleaved pairs.
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _find_rotary(model: nn.Module) -> tuple[nn.Module, str]:
    for path in _ROTARY_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module) and hasattr(obj, "inv_freq"):
            return obj, path
    # Fallback: a text rotary module anywhere, skipping the vision tower's own.
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and "vis" not in name and hasattr(module, "inv_freq"):
            return module, name
    raise ModelError(
        f"cannot find the text rotary embedding of {type(model).__name__} (looked for "
        f"{', '.join(_ROTARY_PATHS)}); key re-rotation supports RoPE language models loaded with transformers"
    )


class KeyRotator:
    """Re-rotates cached RoPE keys of one model so that their tokens sit at other positions.

    ``KeyRotator(model)`` takes the loaded ``...ForConditionalGeneration`` (or an adapter, whose
    ``.model`` is used) and finds its text rotary module; :class:`ModelError` if there is none or its
    frequencies depend on the sequence length. :attr:`rows` is 3 for multimodal RoPE (temporal, height,
    width position rows) and 1 for 1-D RoPE.

    Keys are ``[..., kv_heads, n, head_dim]`` (``[B, H, n, D]`` as in the cache, or ``[H, n, D]``).
    Every method computes in float32 (float64 keys stay float64) and returns a new tensor of the keys'
    dtype and device; inputs are never modified. The model's rotary scaling factor (``attention_scaling``,
    1 for plain RoPE) is part of what :meth:`rotate_to` applies and :meth:`unrotate` removes, and
    :meth:`rotate` keeps it as is.
    """

    def __init__(self, model: Any) -> None:
        if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        if not isinstance(model, nn.Module):
            raise ModelError(f"KeyRotator needs a torch model (or an adapter holding one), got {type(model).__name__}")
        self.rotary, self.rotary_path = _find_rotary(model)
        rope_type = getattr(self.rotary, "rope_type", "default")
        if not isinstance(rope_type, str):
            raise ModelError(f"per-layer RoPE types ({rope_type!r}) are not supported for key re-rotation")
        if "dynamic" in rope_type or rope_type in _POSITION_DEPENDENT_ROPE:
            raise ModelError(
                f"the model uses {rope_type!r} RoPE, whose frequencies change with the sequence length; "
                "cached keys cannot be re-rotated exactly"
            )
        self.rope_type: str = rope_type
        cfg = getattr(self.rotary, "config", None)
        params = getattr(cfg, "rope_parameters", None) or {}
        multimodal = getattr(self.rotary, "mrope_section", None) is not None or "mrope_section" in params
        self.rows: int = 3 if multimodal else 1
        self.head_dim: int = 2 * int(self.rotary.inv_freq.numel())
        self.scaling: float = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)

    def __repr__(self) -> str:
        return f"KeyRotator({self.rotary_path}, rows={self.rows}, head_dim={self.head_dim}, rope_type={self.rope_type!r})"

    # ---- public -------------------------------------------------------------------------------------
    def rotate(self, keys: torch.Tensor, delta: Delta) -> torch.Tensor:
        """Keys re-rotated as if every token's position had moved by ``delta``.

        ``delta`` is an int (every axis moves by it) or, for multimodal RoPE only, a 3-tuple
        ``(dt, dh, dw)`` moving the temporal, height and width axes separately; a tuple on a 1-D RoPE
        model, or anything else, raises :class:`ConfigError`. A zero delta returns ``keys`` itself.
        ``rotate(rotate(k, d), -d)`` gives ``k`` back up to float rounding.
        """
        per_row = _normalize_delta(delta, self.rows)
        self._check_keys(keys)
        if not any(per_row):
            return keys
        offsets = torch.tensor(per_row, dtype=torch.long, device=keys.device).view(self.rows, 1)
        cos, sin = self._cos_sin(offsets, keys, scaled=False)  # [1, D]: one rotation for every token
        return self._apply(keys, cos, sin)

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Position-free keys: remove the rotation the model applied for each token's position.

        ``positions`` is a LongTensor ``[rows, n]`` (``[n]`` means the same number on every axis), one
        column per token of ``keys``; :class:`ConfigError` if it does not fit. The result is the key
        projection's output before RoPE, fit for a retrieval index or for :meth:`rotate_to` later.
        """
        pos = self._check_positions(positions, keys)
        cos, sin = self._cos_sin(pos, keys, scaled=False)  # [n, D]
        out = self._apply(keys, cos, -sin)
        return out if self.scaling == 1.0 else out / self.scaling

    def rotate_to(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the model's RoPE for ``positions`` (``[rows, n]`` or ``[n]``) to position-free keys.

        The inverse of :meth:`unrotate`: the result is what the model would cache for those keys at
        those positions.
        """
        pos = self._check_positions(positions, keys)
        cos, sin = self._cos_sin(pos, keys, scaled=True)
        return self._apply(keys, cos, sin)

    # ---- internals ----------------------------------------------------------------------------------
    def _compute_dtype(self, keys: torch.Tensor) -> torch.dtype:
        return torch.float64 if keys.dtype == torch.float64 else torch.float32

    def _check_keys(self, keys: torch.Tensor) -> None:
        if not isinstance(keys, torch.Tensor) or keys.dim() < 2:
            raise ConfigError("keys must be a tensor shaped [..., kv_heads, n, head_dim]")
        if not keys.dtype.is_floating_point:
            raise ConfigError(f"keys must be a floating-point tensor, got {keys.dtype}")
        if keys.shape[-1] != self.head_dim:
            raise ConfigError(f"keys have head_dim {keys.shape[-1]}, but the model's RoPE rotates {self.head_dim} dims")

    def _check_positions(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        self._check_keys(keys)
        if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ConfigError("positions must be an integer tensor shaped [rows, n]")
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        if positions.dim() != 2 or positions.shape[0] not in (1, self.rows):
            raise ConfigError(f"positions must be shaped [{self.rows}, n] (or [n]), got {list(positions.shape)}")
        if positions.shape[1] != keys.shape[-2]:
            raise ConfigError(f"{positions.shape[1]} positions for {keys.shape[-2]} keys")
        return positions.to(device=keys.device, dtype=torch.long).expand(self.rows, -1)

    @torch.no_grad()
    def _cos_sin(self, positions: torch.Tensor, keys: torch.Tensor, *, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[n, D]`` for ``positions`` ``[rows, n]``, from the model's own rotary module."""
        probe = torch.empty(0, device=keys.device, dtype=torch.float32)  # only dtype and device are read
        if self.rows == 3:
            ids = positions.unsqueeze(1)  # [3, 1, n]: temporal, height, width
        else:
            ids = positions  # [1, n]: batch of one
        cos, sin = self.rotary(probe, ids)
        cos, sin = cos[0], sin[0]
        if not scaled and self.scaling != 1.0:
            cos, sin = cos / self.scaling, sin / self.scaling
        dtype = self._compute_dtype(keys)
        return cos.to(dtype), sin.to(dtype)

    @torch.no_grad()
    def _apply(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        k = keys.to(self._compute_dtype(keys))
        return (k * cos + _rotate_half(k) * sin).to(keys.dtype)

