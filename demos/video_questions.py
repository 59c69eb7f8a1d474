"""Ask questions about a video while it plays, through the library API (no server).

    python demos/video_questions.py                                   # a ShapeWorld clip, answers checked
    python demos/video_questions.py clip.mp4 --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --ask "2s: What is on the table?" --ask "4s: What changed since the start?"

Without a video it writes a ShapeWorld episode (coloured shapes with known ground truth) to a
temporary file and plays it through the shipped ``shapeworld`` model, asking that episode's own
questions at their times; each answer is printed with the frames it rests on and the truth. With a
video, pass a model that knows real scenes and your own ``--ask "TIME: QUESTION"``. Each frame is
read once; a question is answered from the frames already in the cache, never by re-reading them.
Runs in a few seconds on a CPU with the ShapeWorld model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from streamvlm import StreamSession, load_model
from streamvlm.cli import parse_timed_question
from streamvlm.demo import write_episode_clip
from streamvlm.ingest import read_video
from streamvlm.shapeworld.questions import clock, is_correct, make_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", help="a video file (default: a generated ShapeWorld clip)")
    parser.add_argument("--model", default="shapeworld", help="shapeworld, a preset, Hub id or checkpoint directory (default: %(default)s)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames read per second of video (default: %(default)s)")
    parser.add_argument("--ask", action="append", metavar="'TIME: QUESTION'", help="a question at a stream time (repeatable)")
    parser.add_argument("--seed", type=int, default=7, help="ShapeWorld episode when no video is given (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=16.0, help="seconds of ShapeWorld clip (default: %(default)s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        truth: dict[tuple[float, str], object] = {}
        video = args.video
        if video is None:
            video = str(Path(tmp) / "shapeworld.mkv")
            episode = write_episode_clip(video, seed=args.seed, duration_s=args.duration)
            for qa in make_questions(episode, rng_seed=args.seed, per_category=1):
                if qa.category != "forward":  # "tell me when" needs the live worker: see `streamvlm demo`
                    truth[(qa.t, qa.question)] = qa
            print(f"playing ShapeWorld episode {args.seed} ({args.duration:g} s) from {video}")
        questions = sorted([parse_timed_question(q) for q in args.ask or ()] or truth, key=lambda tq: tq[0])
        if not questions:
            raise SystemExit("video_questions: pass at least one --ask 'TIME: QUESTION' with a video")
        session = StreamSession(load_model(args.model))
        right = 0
        for frame in read_video(video, fps=args.fps):
            while questions and questions[0][0] < frame.pts_s:
                right += ask(session, *questions.pop(0), truth)
            session.ingest(frame)
        for t, question in questions:  # asked at or after the last frame
            right += ask(session, t, question, truth)
        if truth:
            print(f"\n{right} of {len(truth)} answers match the ground truth")
        session.close()


def ask(session: StreamSession, t: float, question: str, truth: dict) -> int:
    """Ask at stream time ``t``, print the streamed answer, its evidence and (for ShapeWorld) the truth; 1 if right."""
    print(f"[{clock(t)}] {question}\n        -> ", end="", flush=True)
    answer = session.ask(question, max(t, session.last_t), on_delta=lambda d: print(d, end="", flush=True))
    seen = [e.pts_s for e in answer.evidence]
    span = f"{len(seen)} frames, {clock(seen[0])}-{clock(seen[-1])}" if seen else "no frames"
    qa = truth.get((t, question))
    verdict = ""
    if qa is not None:
        ok = is_correct(qa, answer.text)
        shown = clock(float(qa.answer)) if question.startswith("When") else qa.answer
        verdict = f"; truth: {shown} {'✓' if ok else '✗'}"
    print(f"\n        (evidence: {span}{verdict})")
    return int(qa is not None and is_correct(qa, answer.text))


if __name__ == "__main__":
    main()
