"""``streamvlm demo``: a ShapeWorld stream through the full live engine, answers checked against the truth.

A held-out ShapeWorld episode plays at real time (1 frame/s) into a
:class:`~streamvlm.engine.worker.LiveWorker` running the shipped ShapeWorld model. Scripted questions
are asked at their moments, a forward request ("Tell me when ...") is deferred by the dialogue
controller, and a watch is set at the start. Each answer and alert is printed with its stream time
next to the ground truth (✓/✗); the run ends with accuracy, memory use and frames per second. On a
terminal the current frame is drawn with coloured half-block characters above the log.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .config import MemoryConfig, SamplingConfig, SessionConfig
from .engine.session import StreamSession
from .engine.worker import LiveWorker
from .errors import SourceError
from .models.base import ModelAdapter
from .shapeworld import FORWARD_TOLERANCE_S, QA, Episode, make_episode, make_questions
from .shapeworld.model import FRAME_SIZE
from .shapeworld.questions import WHEN_TOLERANCE_S, appearances, clock, is_correct, parse_clock, watch_target
from .types import Frame

__all__ = ["DemoConfig", "run_demo", "write_episode_clip"]


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 7  # a held-out episode (training uses seeds from 500,000 up)
    duration_s: float = 24.0
    realtime: bool = True  # False: as fast as the model reads (tests)
    draw: bool | None = None  # draw frames; None = only when the output is a terminal
    memory: MemoryConfig = field(default_factory=MemoryConfig)


def write_episode_clip(path: str | Path, seed: int = 7, duration_s: float = 16.0, fps: float = 1.0) -> Episode:
    """Write a ShapeWorld episode to ``path`` as a lossless video (FFV1; use a ``.mkv`` name) and return the episode.

    The frames read back from the file are the rendered frames bit for bit, so the shipped ShapeWorld
    model sees what it was trained on; the episode gives the ground truth to check answers against.
    Raises SourceError if OpenCV cannot write the file.
    """
    import cv2

    episode = make_episode(seed, duration_s=duration_s, fps=fps, size=FRAME_SIZE)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), float(fps), (FRAME_SIZE, FRAME_SIZE))
    if not writer.isOpened():
        raise SourceError(f"cannot write a video to {path} (OpenCV has no FFV1 encoder here; try a .mkv name)")
    try:
        for _, image in episode.frames():
            writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return episode


def _ansi_frame(image: np.ndarray, width: int = 32) -> list[str]:
    """The frame as lines of '▀' characters: each character shows two pixels (foreground over background)."""
    step = max(1, image.shape[1] // width)
    small = image[::step, ::step]
    lines = []
    for y in range(0, small.shape[0] - 1, 2):
        row = []
        for x in range(small.shape[1]):
            (r1, g1, b1), (r2, g2, b2) = small[y, x], small[y + 1, x]
            row.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m▀")
        lines.append("".join(row) + "\x1b[0m")
    return lines


class _Screen:
    """A log that scrolls above a live frame panel (terminal), or a plain log (anything else)."""

    def __init__(self, out: TextIO, draw: bool) -> None:
        self.out, self.draw, self.panel = out, draw, 0

    def log(self, line: str, image: np.ndarray | None = None, status: str = "") -> None:
        if self.draw and self.panel:
            self.out.write(f"\x1b[{self.panel}F\x1b[J")
        if line:
            self.out.write(line + "\n")
        if self.draw and image is not None:
            lines = _ansi_frame(image) + [status]
            self.out.write("\n".join(lines) + "\n")
            self.panel = len(lines)
        self.out.flush()


def _stamp(t: float) -> str:
    """Stream time as ``MM:SS.s``."""
    minutes, seconds = divmod(float(t), 60.0)
    return f"{int(minutes):02d}:{seconds:04.1f}"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


async def run_demo(adapter: ModelAdapter, cfg: DemoConfig = DemoConfig(), out: TextIO = sys.stdout) -> dict[str, Any]:
    """Play the demo episode and return its summary (also printed): accuracy, alerts, memory, frames/s."""
    episode = make_episode(cfg.seed, duration_s=cfg.duration_s, fps=1.0, size=FRAME_SIZE)
    questions = make_questions(episode, rng_seed=cfg.seed, per_category=1)
    colour, shape = watch_target(episode)
    truth_alerts = appearances(episode, colour, shape)
    session = StreamSession(adapter, SessionConfig(sampling=SamplingConfig(max_new_tokens=12)), cfg.memory)
    worker = LiveWorker(session)
    screen = _Screen(out, out.isatty() if cfg.draw is None else cfg.draw)
    asked: dict[str, QA] = {}
    results: list[bool] = []
    alerts: list[bool] = []
    done = asyncio.Event()
    current: dict[str, Any] = {"image": None, "t": 0.0}

    def status() -> str:
        c = worker.counters
        return f"  t={_stamp(current['t'])}  frames read {c.ingested}, skipped {c.skipped}, dropped {c.dropped}"

    async def consume() -> None:
        async for event in worker.events():
            data = event.data
            if event.kind == "answer.done":
                qa = asked.pop(data["request_id"], None)
                answer = data["answer"]
                if qa is None:
                    continue
                if qa.category == "forward":  # scored by when it is answered; the time it says is judged apart
                    ok = abs(answer.asked_at_s - float(qa.answer)) <= FORWARD_TOLERANCE_S
                    said = parse_clock(answer.text)
                    said_ok = said is not None and abs(said - float(qa.answer)) <= FORWARD_TOLERANCE_S
                    truth = (f"appears at {clock(float(qa.answer))}; answered on time (±{FORWARD_TOLERANCE_S:g} s counts) {_mark(ok)}; "
                             f"the time it said {_mark(said_ok)}")
                    screen.log(f"[{_stamp(answer.asked_at_s)}] {qa.question}  -> {answer.text!r}  ({truth})", current["image"], status())
                else:
                    ok = is_correct(qa, answer.text)
                    truth = (f"{clock(float(qa.answer))}, ±{qa.tolerance_s if qa.tolerance_s is not None else WHEN_TOLERANCE_S:g} s counts"
                             if qa.question.startswith("When") else qa.answer)
                    screen.log(f"[{_stamp(answer.asked_at_s)}] {qa.question}  -> {answer.text!r}  (truth: {truth}) {_mark(ok)}",
                               current["image"], status())
                results.append(ok)
            elif event.kind == "acknowledged":  # a forward request: said with its question, answered when it happens
                qa = asked.get(data["request_id"])
                said = f"[{_stamp(qa.t)}] {qa.question}  -> " if qa is not None else "           "
                screen.log(f"{said}(waiting: will answer when {data['condition']})", current["image"], status())
            elif event.kind == "gave_up":
                qa = asked.pop(data["request_id"], None)
                if qa is not None:
                    results.append(False)
                    screen.log(f"           gave up on {qa.question!r}: {data['reason']} {_mark(False)}", current["image"], status())
            elif event.kind == "alert":
                ok = any(abs(data["t"] - t) <= FORWARD_TOLERANCE_S for t in truth_alerts)
                alerts.append(ok)
                truth = (", ".join(clock(t) for t in truth_alerts) + f"; ±{FORWARD_TOLERANCE_S:g} s counts") if truth_alerts else "never"
                screen.log(f"[{_stamp(data['t'])}] ALERT: {data['condition']}  (truth: {truth}) {_mark(ok)}", current["image"], status())
            elif event.kind == "request.ended":  # cancelled or failed: counted as not answered, with the reason
                qa = asked.pop(data["request_id"], None)
                if qa is not None:
                    results.append(False)
                    screen.log(f"           {qa.question!r} {data['status']}: {data['message']} {_mark(False)}",
                               current["image"], status())
            elif event.kind in ("error", "fatal"):
                screen.log(f"{event.kind}: {data.get('message') or data.get('reason')}", current["image"], status())
            if not asked and done.is_set():
                return

    screen.log(f"ShapeWorld episode {cfg.seed}, {cfg.duration_s:.0f} s at 1 frame/s, model {adapter.source}; "
               f"watching for: a {colour} {shape} appears")
    await worker.start()
    consumer = asyncio.create_task(consume())
    worker.watch("watch", f"a {colour} {shape} appears", 0.0)
    start = time.monotonic()
    pending = list(questions)
    for t, image in episode.frames():
        if cfg.realtime:
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
        current.update(image=image, t=t)
        worker.submit_frame(Frame(image, t, "shapeworld"))
        screen.log("", image, status())
        if not cfg.realtime:
            while not worker.idle:
                await asyncio.sleep(0.005)
        while pending and pending[0].t < t + 1:
            qa = pending.pop(0)
            if cfg.realtime:
                await asyncio.sleep(max(0.0, start + qa.t - time.monotonic()))
            while not worker.idle:  # ask once the frames before the question are read
                await asyncio.sleep(0.005)
            request_id = f"q{len(results) + len(asked)}"
            asked[request_id] = qa
            worker.ask(qa.question, qa.t, request_id=request_id)
    while not worker.idle:
        await asyncio.sleep(0.01)
    worker.end_stream()
    await asyncio.sleep(0.1)
    while not worker.idle:
        await asyncio.sleep(0.01)
    wall = time.monotonic() - start
    done.set()
    await worker.stop()
    await consumer
    for qa in asked.values():  # never answered (e.g. the stream ended first)
        results.append(False)
        screen.log(f"           no answer to {qa.question!r} {_mark(False)}")
    stats = session.stats()
    c = worker.counters
    summary = {
        "questions": len(results),
        "correct": sum(results),
        "alerts": len(alerts),
        "alerts_correct": sum(alerts),
        "alerts_expected": len(truth_alerts),
        "frames_read": c.ingested,
        "frames_skipped": c.skipped,
        "frames_dropped": c.dropped,
        "frames_per_s": round(c.received / wall, 2),
        "working_tokens": stats["cache_tokens"],
        "working_bytes": stats["cache_bytes"],
    }
    screen.log(
        f"\naccuracy {summary['correct']}/{summary['questions']}; alerts {summary['alerts_correct']} right of "
        f"{summary['alerts']} raised ({summary['alerts_expected']} expected); frames {c.received} at "
        f"{summary['frames_per_s']}/s (read {c.ingested}, skipped as unchanged {c.skipped}, dropped {c.dropped}); "
        f"working memory {stats['cache_tokens']} tokens, {stats['cache_bytes'] / 2**10:.0f} KiB"
    )
    session.close()
    return summary
