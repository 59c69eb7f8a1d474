"""Ask questions about a video while it plays, through the library API.

    python demos/video_questions.py clip.mp4 --model Qwen/Qwen2.5-VL-3B-Instruct

Without arguments it plays a generated clip through the tiny random-weight SmolVLM preset (its
answers are noise; the point is the flow). Each frame is read once; questions are asked at their
stream times and answered from the frames already in the cache.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from streamvlm import StreamSession, load_model
from streamvlm.ingest import read_video, write_test_clip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("video", nargs="?")
    parser.add_argument("--model", default="tiny-smolvlm")
    parser.add_argument("--fps", type=float, default=1.0)
    args = parser.parse_args()

    questions = {2.0: "What is in the picture?", 4.0: "What changed since the start?"}
    with tempfile.TemporaryDirectory() as tmp:
        video = args.video or write_test_clip(Path(tmp) / "clip.mp4", seconds=5.0)
        session = StreamSession(load_model(args.model))
        for frame in read_video(video, fps=args.fps):
            for t in [t for t in questions if t < frame.pts_s]:
                ask(session, t, questions.pop(t))
            session.ingest(frame)
        for t in sorted(questions):
            ask(session, t, questions[t])


def ask(session: StreamSession, t: float, question: str) -> None:
    print(f"[{t:5.1f}s] {question}\n         ", end="")
    answer = session.ask(question, max(t, session.last_t), on_delta=lambda d: print(d, end="", flush=True))
    seen = [f"{e.pts_s:.1f}s" for e in answer.evidence]
    print(f"\n         (from {len(seen)} frames: {', '.join(seen)})")


if __name__ == "__main__":
    main()
