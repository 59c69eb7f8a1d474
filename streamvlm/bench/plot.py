"""Small charts for ``bench memory`` and ``bench quality``, drawn with OpenCV (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import ConfigError

__all__ = ["plot_memory_samples", "plot_quality"]

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
    return _write(img, path)


def _write(img: np.ndarray, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
        raise ConfigError(f"plot: cannot write {out}")
    return out


_POLICY_COLOURS = ((200, 60, 30), (40, 140, 40), (30, 110, 220), (150, 60, 170), (120, 120, 120))
_PANELS = ("realtime", "backward", "when", "forward")


def plot_quality(result: dict[str, Any], path: str | Path, *, panel: tuple[int, int] = (420, 300)) -> Path:
    """Accuracy against working-memory budget (100 % = full memory), one panel per category, one line per
    policy: thick with dots = retrieval on, thin with squares = retrieval off. Writes a PNG to ``path``."""
    rows = result.get("sweep") or []
    if not rows:
        raise ConfigError("plot: the result has no sweep (run without --no-sweep)")
    full = result["full"]["accuracy"]
    budgets = sorted({1.0, *(r["budget"] for r in rows)}, reverse=True)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    pw, ph = panel
    legend = 190
    img = np.full((2 * ph + 40, 2 * pw + legend, 3), 255, np.uint8)
    text = lambda s, xy, scale=0.42: cv2.putText(img, s, xy, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)  # noqa: E731
    text(f"{result.get('model')}: accuracy vs the frames' share of working memory (100 % = full memory)", (10, 22), 0.5)
    for i, cat in enumerate(_PANELS):
        x0, y0 = (i % 2) * pw, 40 + (i // 2) * ph
        left, right, top, bottom = x0 + 50, x0 + pw - 15, y0 + 25, y0 + ph - 35
        cv2.rectangle(img, (left, top), (right, bottom), (0, 0, 0), 1)
        text(cat, (left + 5, top - 6), 0.5)
        fx = lambda b: int(left + budgets.index(b) / max(1, len(budgets) - 1) * (right - left))  # noqa: E731
        fy = lambda a: int(bottom - a * (bottom - top))  # noqa: E731
        for a in (0.0, 0.5, 1.0):
            cv2.line(img, (left, fy(a)), (right, fy(a)), (225, 225, 225), 1)
            text(f"{a:.1f}", (left - 32, fy(a) + 4))
        for b in budgets:
            text(f"{b:.0%}", (fx(b) - 12, bottom + 16))
        for j, policy in enumerate(policies):
            colour = _POLICY_COLOURS[j % len(_POLICY_COLOURS)]
            for retrieval in (True, False):
                pts = [(1.0, full.get(cat))] + [(r["budget"], r["accuracy"].get(cat)) for r in rows
                                                if r["policy"] == policy and r["retrieval"] == retrieval]
                pts = [(fx(b), fy(a)) for b, a in sorted(pts, reverse=True) if a is not None]
                if len(pts) > 1:
                    cv2.polylines(img, [np.array(pts, np.int32)], False, colour, 2 if retrieval else 1, cv2.LINE_AA)
                for p in pts:
                    if retrieval:
                        cv2.circle(img, p, 4, colour, -1, cv2.LINE_AA)
                    else:
                        cv2.rectangle(img, (p[0] - 3, p[1] - 3), (p[0] + 3, p[1] + 3), colour, 1)
    lx = 2 * pw + 10
    for j, policy in enumerate(policies):
        colour = _POLICY_COLOURS[j % len(_POLICY_COLOURS)]
        cv2.line(img, (lx, 70 + 22 * j), (lx + 25, 70 + 22 * j), colour, 2)
        text(policy, (lx + 32, 75 + 22 * j))
    y = 80 + 22 * len(policies)
    cv2.circle(img, (lx + 12, y), 4, (0, 0, 0), -1)
    text("retrieval on", (lx + 32, y + 5))
    cv2.rectangle(img, (lx + 9, y + 19), (lx + 15, y + 25), (0, 0, 0), 1)
    text("retrieval off", (lx + 32, y + 27))
    return _write(img, path)
