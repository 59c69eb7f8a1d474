"""A small line chart of ``bench memory`` samples, drawn with OpenCV (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import ConfigError

__all__ = ["plot_memory_samples"]

_SERIES = (("working_bytes", (200, 60, 30)), ("store_ram_bytes", (40, 140, 40)), ("store_disk_bytes", (30, 110, 220)), ("rss_bytes", (120, 120, 120)))


def plot_memory_samples(result: dict[str, Any], path: str | Path, *, size: tuple[int, int] = (900, 520)) -> Path:
    """Draw working memory, store RAM/disk and RSS (MiB, log scale) against frames; write a PNG to ``path``."""
    samples = result.get("samples") or []
    if not samples:
        raise ConfigError("plot: the result has no samples")
    width, height = size
    left, right, top, bottom = 90, 210, 40, 60
    img = np.full((height, width, 3), 255, np.uint8)
    frames = np.array([s["frame"] for s in samples], float)
    values = {k: np.maximum(np.array([s[k] for s in samples], float) / 2**20, 1e-3) for k, _ in _SERIES}
    lo = np.log10(min(v.min() for v in values.values()))
    hi = np.log10(max(v.max() for v in values.values())) + 0.1
    fx = lambda f: int(left + (f - frames.min()) / max(1.0, frames.max() - frames.min()) * (width - left - right))  # noqa: E731
    fy = lambda v: int(height - bottom - (np.log10(v) - lo) / max(1e-9, hi - lo) * (height - top - bottom))  # noqa: E731
    cv2.rectangle(img, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
    for decade in range(int(np.floor(lo)), int(np.ceil(hi)) + 1):
        y = fy(10.0**decade)
        if top <= y <= height - bottom:
            cv2.line(img, (left - 4, y), (width - right, y), (225, 225, 225), 1)
            cv2.putText(img, f"{10.0 ** decade:g} MiB", (5, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (key, colour) in enumerate(_SERIES):
        pts = np.array([[fx(f), fy(v)] for f, v in zip(frames, values[key])], np.int32)
        cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        cv2.line(img, (width - right + 15, top + 20 + 22 * i), (width - right + 40, top + 20 + 22 * i), colour, 2)
        cv2.putText(img, key, (width - right + 45, top + 25 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"frames (0..{int(frames.max())})", (left + 200, height - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    title = f"{result.get('model')} / {result.get('policy')} / budget {result.get('budget_tokens')} tokens"
    cv2.putText(img, title, (left, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
        raise ConfigError(f"plot: cannot write {out}")
    return out
