"""The one place that edits transformers' cache tensors on behalf of the memory manager.

A ``DynamicCache`` in transformers 5.23 keeps, per layer, ``keys`` and ``values`` of shape
``[batch, kv_heads, seq, head_dim]`` (keys after RoPE). These functions slice, gather, append and
re-rotate along ``seq`` in every layer at once. They know nothing about chunks or policies: the
manager translates a plan into physical token indices first.

Nothing here writes into a cache tensor in place: every edit builds new tensors and assigns them to
the layer. The runner's forward passes make the cache's tensors under ``torch.inference_mode``
(inference tensors), and the manager edits them outside it, between steps; torch refuses an
in-place update of an inference tensor outside inference mode (and the reverse mix is just as
fragile), so an edit that wrote in place would work or crash depending on which step made the
tensor last. Building new tensors works whichever way the tensor was made, and leaves any tensor a
caller still holds (a snapshot, a store record) untouched.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["keep_tokens", "extract", "append", "remove_span", "rotate_span", "rotate_spans", "token_values", "layer_tensors", "load_tensors"]


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.dim() == 4]


def keep_tokens(cache, index: torch.Tensor) -> None:
    """Keep only the physical positions in ``index`` (ascending LongTensor) in every layer."""
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(2, index)
        layer.values = layer.values.index_select(2, index)


def extract(cache, start: int, end: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of the keys and values of ``[start, end)``, one ``[kv_heads, n, head_dim]`` tensor per layer."""
    layers = _layers(cache)
    return [l.keys[0, :, start:end].clone() for l in layers], [l.values[0, :, start:end].clone() for l in layers]


def append(cache, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Append per-layer ``[kv_heads, n, head_dim]`` keys and values at the end of the cache."""
    for layer, k, v in zip(_layers(cache), keys, values):
        layer.keys = torch.cat([layer.keys, k[None].to(layer.keys.dtype)], dim=2)
        layer.values = torch.cat([layer.values, v[None].to(layer.values.dtype)], dim=2)


def remove_span(cache, start: int, end: int) -> None:
    """Remove physical positions ``[start, end)`` in every layer."""
    for layer in _layers(cache):
        layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys[:, :, end:]], dim=2)
        layer.values = torch.cat([layer.values[:, :, :start], layer.values[:, :, end:]], dim=2)


def rotate_span(cache, start: int, end: int, rotator, delta: int) -> None:
    """Re-rotate the keys of ``[start, end)`` as if their positions moved by ``delta`` (values unchanged)."""
    rotate_spans(cache, [(start, end, delta)], rotator)


def rotate_spans(cache, spans: list[tuple[int, int, int]], rotator) -> None:
    """Re-rotate several ``(start, end, delta)`` spans of keys at once (ascending, not overlapping).

    Each layer's keys are rebuilt once, whatever the number of spans; tokens outside the spans and
    all values are unchanged.
    """
    spans = [(start, end, delta) for start, end, delta in spans if delta != 0 and end > start]
    if not spans:
        return
    for layer in _layers(cache):
        keys = layer.keys
        pieces, done = [], 0
        for start, end, delta in spans:
            pieces.append(keys[:, :, done:start])
            pieces.append(rotator.rotate(keys[:, :, start:end], delta))
            done = end
        pieces.append(keys[:, :, done:])
        layer.keys = torch.cat(pieces, dim=2)


def token_values(cache, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token value norms ``[n]`` and value vectors pooled over layers ``[n, kv_heads*head_dim]``."""
    with torch.no_grad():
        v = torch.stack([l.values[0, :, start:end].float() for l in _layers(cache)])  # [L, H, n, D]
        norms = v.norm(dim=-1).mean(dim=(0, 1))
        pooled = v.mean(dim=0).permute(1, 0, 2).reshape(end - start, -1)
    return norms.numpy(), pooled.numpy()


def layer_tensors(cache) -> dict[str, torch.Tensor]:
    """Every layer's keys and values by name, for saving a snapshot."""
    out = {}
    for i, layer in enumerate(_layers(cache)):
        out[f"k{i}"], out[f"v{i}"] = layer.keys.contiguous(), layer.values.contiguous()
    return out


def load_tensors(cache, tensors: dict[str, torch.Tensor], layers: int) -> None:
    """Fill an empty cache from :func:`layer_tensors` output."""
    for i in range(layers):
        cache.update(tensors[f"k{i}"], tensors[f"v{i}"], i)
