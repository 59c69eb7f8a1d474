"""The ``streamvlm`` command line.

``streamvlm run [VIDEO]``          play a video through the model as if live and answer timed questions
``streamvlm check-model MODEL``    prove streamed == offline logits for a checkpoint, print JSON
``streamvlm bench latency|memory|retrieval|live|serve``   benchmarks
``streamvlm serve``                the realtime WebSocket API and the web client on one port
``streamvlm watch SOURCE...``      monitor cameras with one model and raise alerts (SQLite log, webhook, JSONL)
``streamvlm events``               list logged answers and alerts
``streamvlm bench memory ...``     working memory, store and RSS over a long stream under a token budget

Errors from the exception tree print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cameras import DEFAULT_READ_FPS
from .config import POLICIES, IngestConfig, MemoryConfig, ModelConfig, SamplingConfig, ServerConfig, SessionConfig, parse_size
from .errors import ConfigError, StreamVLMError

__all__ = ["main", "parse_timed_question"]

_DEFAULT_QUESTIONS = ("1s: What colour is the background?", "3s: Where did the square move since the start?")
_TIME = re.compile(r"^\s*(?:(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?|(?P<clock>\d+(?::\d{1,2}){1,2}(?:\.\d+)?))\s*$")


def parse_timed_question(spec: str) -> tuple[float, str]:
    """Split ``"12s: what is on the board?"`` into ``(12.0, "what is on the board?")``.

    Times may be ``95``, ``95s``, ``1m35s``, ``1h2m``, ``01:35`` or ``1:01:35``. Raises ConfigError otherwise.
    """
    head, sep, question = spec.partition(": ") if ": " in spec else spec.partition(" ")
    match = _TIME.match(head) if sep else None
    if not match or not question.strip() or not head.strip():
        raise ConfigError(f"--ask {spec!r}: expected 'TIME: question', e.g. '12s: what is on the table?'")
    if match.group("clock"):
        seconds = 0.0
        for part in match.group("clock").split(":"):
            seconds = seconds * 60 + float(part)
    else:
        seconds = int(match.group("h") or 0) * 3600 + int(match.group("m") or 0) * 60 + float(match.group("s") or 0)
    return seconds, question.strip()


def _clock(t: float) -> str:
    minutes, seconds = divmod(t, 60)
    return f"{int(minutes):02d}:{seconds:04.1f}"


def _emit_json(result: dict, path: str | None) -> int:
    """Print a benchmark result and, with ``--json OUT``, write it there too."""
    text = json.dumps(result, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    print(text)
    return 0


def _random_label(model: str) -> str:
    from .models.tiny import is_preset

    return " (random weights: answers are noise; pass --model with a real checkpoint)" if is_preset(model) else ""


# ---- run -----------------------------------------------------------------------------------------------
_FINISH = {"stop": "finished", "length": "stopped at the length limit (--max-new-tokens)", "cancelled": "cancelled"}


def _seconds(s: float) -> str:
    """A short wall-clock duration: ``12 ms`` below a second, ``1.24 s`` above."""
    return f"{s * 1000:.0f} ms" if s < 1.0 else f"{s:.2f} s"


def _timed_questions(specs: Sequence[str]) -> list[tuple[float, str]]:
    """Parse every ``--ask``; sorted by time only, so questions at the same time keep the order given."""
    return sorted((parse_timed_question(q) for q in specs), key=lambda tq: tq[0])


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of a command's ``--model``, ``--device`` and ``--dtype``.

    Raises ConfigError at once on a bad value or a device this machine lacks (before any model loads).
    """
    from .models.device import choose_precision

    cfg = ModelConfig(model=args.model, dtype=args.dtype, device=args.device)
    choose_precision(cfg.device, cfg.dtype)
    return cfg


def _with_precision(result: dict, args: argparse.Namespace) -> dict:
    """``result`` with the ``device``, ``dtype`` and ``dtype_reason`` the model ran in (same rule, same answer as at load)."""
    from .models.device import choose_precision

    return {**result, **choose_precision(args.device, args.dtype).to_dict()}


def _add_precision_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps "
                                                         "(default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 where the GPU or CPU does it natively, else float32), "
                                                        "float32, bfloat16 or float16 (default: auto; the choice is printed on stderr)")


def _check_memory_budget(budget: int | None, flag: str = "--memory-budget") -> None:
    if budget is not None and budget < 16:
        raise ConfigError(f"{flag} {budget}: a working memory needs at least 16 tokens (or leave it out: unbounded)")


class _RunDialogue:
    """Drives the dialogue controller for ``run``: answers now, or when a "Tell me when ..." condition is seen.

    The same controller the live server uses decides; this class only does what it says on the one
    session (probe, answer) and prints. Next: :meth:`ask` for each question at its time, :meth:`frame`
    after each ingested frame, :meth:`end` once the video ended.
    """

    def __init__(self, session: Any, clip_end: float | None) -> None:
        from .dialogue.controller import ControllerConfig, DialogueController

        self.session, self.clip_end = session, clip_end
        self.controller = DialogueController(ControllerConfig(interrupt=False))  # one at a time, in order
        self.asked: dict[str, float] = {}

    def ask(self, t: float, question: str) -> None:
        t = max(t, self.session.last_t)  # never before a frame already read
        request_id = f"q{len(self.asked)}"
        self.asked[request_id] = t
        print(f"[{_clock(t)}] Q: {question}")
        self._act(self.controller.user_message(request_id, question, t))

    def frame(self, t: float) -> None:
        self._act(self.controller.frame(t))

    def end(self, t: float) -> None:
        self._act(self.controller.stream_ended(t))

    def _act(self, actions: list) -> None:
        from .dialogue.controller import Acknowledge, AnswerNow, GiveUp, Poll

        for action in actions:
            if isinstance(action, Acknowledge):
                print(f"           (will answer when {action.condition}: watching the video for it)")
            elif isinstance(action, Poll):
                scores = self.session.probe([p.prompt for p in action.probes])
                self._act(self.controller.scores(action.t, {p.probe_id: s for p, s in zip(action.probes, scores)}))
            elif isinstance(action, AnswerNow):
                self._answer(action)
            elif isinstance(action, GiveUp):
                print(f"[{_clock(action.t)}] no answer to {action.question!r}: what it waits for was not seen before the video ended")

    def _answer(self, action: Any) -> None:
        t = max(action.t, self.session.last_t)
        self.controller.generation_started(action.request_id, t)
        asked_at = self.asked.get(action.request_id, t)
        late = f" (asked at {_clock(asked_at)}; seen now)" if action.trigger == "deferred" else ""
        print(f"[{_clock(t)}] A{late}: ", end="", flush=True)
        first: list[float] = []
        start = time.perf_counter()

        def show(delta: str) -> None:
            first.append(first[0] if first else time.perf_counter() - start)
            print(delta, end="", flush=True)

        ans = self.session.ask(action.question, t, on_delta=show, time_range=action.evidence)
        span = f"{_clock(ans.evidence[0].pts_s)}-{_clock(ans.evidence[-1].pts_s)}" if ans.evidence else "none"
        ttft = _seconds(first[0]) if first else "no text"
        print(f"\n    evidence: {len(ans.evidence)} frames {span} | first text after {ttft} | "
              f"{_FINISH.get(ans.finish_reason, ans.finish_reason)}")
        if self.clip_end is not None and asked_at > self.clip_end + 1e-6:
            print(f"    (asked at {_clock(asked_at)}, after the video ended at {_clock(self.clip_end)}: answered from the whole clip)")
        self._act(self.controller.generation_finished(action.request_id, t))


def _cmd_run(args: argparse.Namespace) -> int:
    from .engine import StreamSession
    from .ingest import probe_video, read_video, write_test_clip
    from .models import load_model, locate

    # Every check that needs no model runs first: a typo fails in milliseconds, not after loading.
    ingest_cfg = IngestConfig(fps=args.fps, realtime=not args.fast)
    questions = _timed_questions(args.ask or (_DEFAULT_QUESTIONS if args.video is None else ()))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    _check_memory_budget(args.memory_budget)
    memory = MemoryConfig(
        budget_tokens=args.memory_budget, policy=args.policy, positions=args.positions, retrieval_top_k=args.retrieve,
        store_ram_bytes=parse_size(args.store_ram, what="--store-ram"), store_disk_bytes=parse_size(args.store_disk, what="--store-disk"),
    )
    session_cfg = SessionConfig(sampling=sampling, **({"system_prompt": args.system} if args.system else {}))
    locate(args.model)
    model_cfg = _model_config(args)
    clip_end = probe_video(args.video).duration_s if args.video is not None else 4.0
    if clip_end is not None:
        for t, q in questions:
            if t > clip_end + 1e-6:
                print(f"streamvlm: warning: --ask {_clock(t)} {q!r} is past the end of the video ({_clock(clip_end)}); "
                      "it is answered at the end, from the whole clip", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="streamvlm-") as tmp:
        video = args.video
        if video is None:
            video = str(write_test_clip(Path(tmp) / "demo.mp4", seconds=4.0, fps=10.0, size=(160, 120)))
            print(f"streamvlm: no video given, playing a generated 4 s clip ({video})", file=sys.stderr)
        print(f"streamvlm: loading {args.model}{_random_label(args.model)}", file=sys.stderr)
        adapter = load_model(model_cfg)
        session = StreamSession(adapter, session_cfg, memory)
        dialogue = _RunDialogue(session, clip_end)
        pending = list(questions)
        wall0, pts0, dropped, ingested, last = time.perf_counter(), None, 0, 0, 0.0

        def ask_due(up_to: float) -> None:
            while pending and pending[0][0] <= up_to:
                dialogue.ask(*pending.pop(0))

        def report_memory() -> None:
            for e in session.drain_events():
                if e.kind in ("evicted", "dropped", "compressed", "merged"):
                    up_to = f" up to {_clock(e.up_to_s)}" if e.up_to_s is not None else ""
                    print(f"streamvlm: memory {e.kind} {e.chunks} chunk(s){up_to}: {e.tokens_before} -> {e.tokens_after} tokens", file=sys.stderr)

        for frame in read_video(video, fps=ingest_cfg.fps):
            pts0 = frame.pts_s if pts0 is None else pts0
            ask_due(frame.pts_s - 1e-9)
            if ingest_cfg.realtime:
                lag = (time.perf_counter() - wall0) - (frame.pts_s - pts0)
                if lag < 0:
                    time.sleep(-lag)
                elif lag > 1.0 / ingest_cfg.fps:  # a live source would have moved on: drop, latest wins
                    dropped += 1
                    continue
            session.ingest(frame)
            ingested, last = ingested + 1, frame.pts_s
            dialogue.frame(frame.pts_s)
            if args.verbose:
                report_memory()
        ask_due(float("inf"))
        dialogue.end(max([last, *(t for t, _ in questions)]))
        stats = session.stats()
        print(
            f"streamvlm: {ingested} frames read once, {dropped} dropped to keep real time, "
            f"{stats['cache_tokens']} tokens in working memory ({stats['cache_bytes'] / 2**20:.1f} MiB), "
            f"{stats['chunks_stored']} chunks in the long-term store, {stats['chunks_dropped']} dropped from it",
            file=sys.stderr,
        )
        session.close()
    return 0


# ---- check-model -----------------------------------------------------------------------------------------
def _cmd_check(args: argparse.Namespace) -> int:
    from .engine.check import check_dtypes, synthetic_frames

    dtypes = _split_names(args.dtype) or ("float32",)
    ModelConfig(model=args.model, device=args.device)  # a bad --device fails before any model loads
    for name in dtypes:
        ModelConfig(model=args.model, dtype=name)
    reports = check_dtypes(args.model, dtypes, synthetic_frames(args.frames), args.question, device=args.device,
                           max_new_tokens=args.max_new_tokens, tolerance=args.tolerance)
    # float32 defines exactness: its report is the top level; every dtype checked is under "checks"
    result = {**reports[0].to_dict(), "checks": [r.to_dict() for r in reports], "ok": all(r.ok for r in reports)}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


# ---- bench -------------------------------------------------------------------------------------------------
def _cmd_bench_latency(args: argparse.Namespace) -> int:
    from .bench.latency import run_latency_bench

    try:
        counts = sorted({int(x) for x in args.frames.split(",") if x.strip()})
    except ValueError as exc:
        raise ConfigError(f"--frames {args.frames!r}: expected comma-separated integers like 16,64,128") from exc
    if not counts or counts[0] < 1:
        raise ConfigError("--frames needs at least one count >= 1")
    result = run_latency_bench(_model_config(args), counts, repeats=args.repeats, progress=not args.quiet,
                               memory_budget=args.memory_budget, naive=not args.no_naive)
    return _emit_json(result, args.json)


def _cmd_bench_memory(args: argparse.Namespace) -> int:
    from .bench.memory import run_memory_bench

    ram, disk = parse_size(args.store_ram, what="--store-ram"), parse_size(args.store_disk, what="--store-disk")
    result = run_memory_bench(
        _model_config(args), args.frames, args.policy, budget_tokens=args.budget, store_ram_bytes=ram, store_disk_bytes=disk,
        sample_every=args.sample_every, progress=not args.quiet,
    )
    if args.plot:
        from .bench.plot import plot_memory_samples

        plot_memory_samples(result, args.plot)
    return _emit_json(_with_precision(result, args), args.json)


def _cmd_bench_retrieval(args: argparse.Namespace) -> int:
    from .bench.retrieval import run_retrieval_bench

    if args.chunks < 1:
        raise ConfigError("--chunks must be >= 1")
    result = run_retrieval_bench(args.chunks, layers=args.layers, kv_heads=args.kv_heads, q_heads=args.q_heads, head_dim=args.head_dim, top_k=args.top_k)
    return _emit_json(result, args.json)


def _cmd_bench_live(args: argparse.Namespace) -> int:
    from .bench.live import run_live_bench

    if not (args.fps > 0 and args.duration > 0):
        raise ConfigError("--fps and --duration must be > 0")
    result = run_live_bench(_model_config(args), args.fps, args.duration, budget_tokens=args.budget, probe_every=args.probe_every)
    return _emit_json(_with_precision(result, args), args.json)


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from .bench.quality import QualityConfig, run_quality
    from .models import load_model, precision_of

    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    try:
        budgets = tuple(float(b) / 100 for b in args.budgets.split(",") if b.strip())
    except ValueError as exc:
        raise ConfigError(f"--budgets {args.budgets!r}: expected comma-separated percentages like 50,25,10") from exc
    try:
        rates = tuple(float(r) for r in args.rates.split(",") if r.strip()) if args.rates else ()
    except ValueError as exc:
        raise ConfigError(f"--rates {args.rates!r}: expected comma-separated frames per second like 1,2,10") from exc
    long = args.episode_seconds is not None
    cfg = QualityConfig(episodes=args.episodes, duration_s=args.episode_seconds if long else args.duration, budgets=budgets,
                        policies=policies, seed_base=args.seed, retrieval_top_k=args.top_k, split=args.split,
                        layout="long" if long else "short", positions="reindex" if long else args.positions,
                        rates=rates, read_fps=args.read_fps, answer_format=args.answer_format, deferred_time=args.deferred_time)
    adapter = load_model(_model_config(args))
    result = run_quality(adapter, cfg, sweep=not args.no_sweep, progress=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True))
    if not args.quiet:
        from .bench.quality import format_table

        print(format_table(result), file=sys.stderr, flush=True)
    if args.plot:
        from .bench.plot import plot_quality

        plot_quality(result, args.plot)
    return _emit_json({**result, **precision_of(adapter).to_dict()}, args.json)


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from .demo import DemoConfig, run_demo
    from .models import load_model

    adapter = load_model(_model_config(args))
    cfg = DemoConfig(seed=args.seed, duration_s=args.duration, realtime=not args.fast, draw=False if args.no_draw else None)
    asyncio.run(run_demo(adapter, cfg))
    return 0


def _events_db(path: str | None) -> Path:
    from .config import streamvlm_home

    return Path(path) if path else streamvlm_home() / "events.db"


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .models import load_model, locate
    from .server.app import serve_forever

    config = ServerConfig(
        host=args.host, port=args.port, token=args.token, allowed_origins=tuple(args.allowed_origin or ()),
        allowed_hosts=tuple(args.allowed_host or ()), max_sessions=args.max_sessions, session_budget_tokens=args.session_budget,
        max_session_budget_tokens=max(args.max_session_budget, args.session_budget), global_budget_tokens=args.global_budget,
        max_parked_sessions=args.max_parked, max_watches=args.max_watches, max_open_responses=args.max_open_responses, engine=args.engine, frame_time_share=args.frame_time_share, resume_window_s=args.resume_window,
        session_store_ram_bytes=parse_size(args.store_ram, what="--store-ram"),
        session_store_disk_bytes=parse_size(args.store_disk, what="--store-disk"), event_db=str(_events_db(args.event_db)), ice_servers=tuple(args.ice_server or ()),
    )
    locate(args.model)
    model_cfg = _model_config(args)
    handoff = _serve_handoff(args)
    if args.ray:
        return _serve_on_ray(args, model_cfg, config)
    _check_port_free(config.host, config.port)  # a busy port is one line now, not a traceback after the model loaded
    print(f"streamvlm: loading {args.model}{_random_label(args.model)}", file=sys.stderr)
    adapter = load_model(model_cfg)
    try:
        asyncio.run(serve_forever(adapter, config, handoff))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port was taken between the check and the bind
        raise ConfigError(f"cannot serve on {config.host}:{config.port}: {exc.strerror or exc}") from exc
    return 0


def _serve_handoff(args: argparse.Namespace):
    """The shared-snapshot settings of ``serve`` (checked before any model loads); a Handoff without --ray."""
    import os

    from .server.handoff import Handoff, HandoffConfig

    if not args.ray:
        for flag, value in (("--replicas", args.replicas), ("--gpus-per-replica", args.gpus_per_replica),
                            ("--ray-address", args.ray_address)):
            if value is not None:
                raise ConfigError(f"{flag} needs --ray")
    elif not args.snapshot_dir:
        raise ConfigError("--ray needs --snapshot-dir: a directory every replica shares, for sessions to resume on any replica")
    if not args.snapshot_dir:
        return None
    every = None if args.snapshot_every == 0 else args.snapshot_every
    config = HandoffConfig(os.path.abspath(args.snapshot_dir), every)
    return None if args.ray else Handoff(config)


def _serve_on_ray(args: argparse.Namespace, model_cfg, config) -> int:
    import os

    from .deploy.serve import DeployConfig, run

    deploy = DeployConfig(model=model_cfg, server=config, replicas=args.replicas or 1,
                          gpus_per_replica=args.gpus_per_replica or 0.0, snapshot_dir=os.path.abspath(args.snapshot_dir),
                          snapshot_every_s=None if args.snapshot_every == 0 else args.snapshot_every,
                          env={k: v for k, v in os.environ.items() if k == "STREAMVLM_HOME"})
    _check_port_free(config.host, config.port)
    run(deploy, address=args.ray_address)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Raise ConfigError naming the port if ``host:port`` cannot be bound now (in use, or not an address here)."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r}: not an address this machine can bind ({exc.strerror})") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closing socket does not count
            try:
                probe.bind(address)
            except OSError as exc:
                busy = "is already in use (another streamvlm serve?); pick another with --port" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise ConfigError(f"cannot serve on {host}:{port}: the port {busy}") from exc


def _cmd_watch(args: argparse.Namespace) -> int:
    import asyncio

    from .models import load_model
    from .watch import CameraWatch, check_source

    plan = _watch_plan(args)  # every setting checked before the model loads
    labelled = len(plan.cameras) > 1 or bool(args.config)
    for camera in plan.cameras:
        check_source(camera.source, camera.name if labelled else None)  # a file that is not a video fails here
    args.model = args.model or plan.model or "tiny-smolvlm"
    args.device = plan.device if args.device == "auto" and plan.device else args.device
    args.dtype = plan.dtype if args.dtype == "auto" and plan.dtype else args.dtype
    model_cfg = _model_config(args)  # and a device this machine lacks
    print(f"streamvlm: loading {args.model}{_random_label(args.model)} once for {len(plan.cameras)} camera(s)", file=sys.stderr)
    adapter = load_model(model_cfg)
    log = args.log or plan.log
    watch = CameraWatch(adapter, plan.cameras, event_db=Path(args.event_db) if args.event_db else (plan.event_db or _events_db(None)),
                        webhook=args.webhook or plan.webhook, jsonl=Path(log) if log else None,
                        duration_s=args.duration if args.duration is not None else plan.duration_s, session_name=args.name,
                        labelled=labelled)
    code = 0
    try:
        asyncio.run(watch.run())
    except KeyboardInterrupt:
        code = 130
    for line in watch.summary_lines():
        print(line, file=sys.stderr)
    print(f"streamvlm: {sum(r.alerts for r in watch.reports)} alert(s) raised", file=sys.stderr)
    failed = [r for r in watch.reports if r.failure]
    if code == 0 and failed:
        single = watch.failures()[0] if len(plan.cameras) == 1 else None
        if single is not None:
            raise single
        from .errors import SourceError

        raise SourceError(f"{len(failed)} of {len(plan.cameras)} camera(s) failed: "
                          + "; ".join(f"camera {r.name!r}: {r.failure}" for r in failed))
    return code


def _watch_plan(args: argparse.Namespace) -> Any:
    """The cameras of ``watch`` (a WatchPlan): SOURCE arguments and --source with the --alert/--fps/... flags, or
    --config FILE. Raises ConfigError naming the flag, or the file, camera and key; loads and opens nothing."""
    from .cameras import WatchPlan, cameras_from_sources, load_plan

    sources = list(args.source or ()) + list(args.more_sources or ())
    if args.config:
        if sources:
            raise ConfigError("watch: give cameras as SOURCE arguments (or --source) or in --config FILE, not both")
        for flag, value in (("--alert", args.alert), ("--fps", args.fps), ("--cooldown", args.cooldown),
                            ("--memory-budget", args.memory_budget), ("--policy", args.policy)):
            if value is not None:
                raise ConfigError(f"{flag} does not combine with --config: set it in {args.config} "
                                  "(at the top for every camera, or in a [[camera]] table)")
        return load_plan(args.config)
    if not sources:
        raise ConfigError("watch needs a camera: SOURCE [SOURCE ...], --source SOURCE (repeatable) or --config cameras.toml")
    if not args.alert:
        raise ConfigError("watch needs at least one --alert CONDITION")
    if args.fps is not None and not 0 <= args.fps <= 60:
        raise ConfigError(f"--fps: frames read per second must be in (0, 60], or 0 for every frame, got {args.fps!r}")
    if args.cooldown is not None:
        from .dialogue import TriggerSpec

        TriggerSpec(cooldown_s=args.cooldown)  # a bad cooldown fails here too (ConfigError)
    budget = 4096 if args.memory_budget is None else args.memory_budget
    _check_memory_budget(budget)
    MemoryConfig(budget_tokens=budget, policy=args.policy or "merge")  # so do bad memory settings
    fps = DEFAULT_READ_FPS if args.fps is None else args.fps
    return WatchPlan(cameras_from_sources(sources, args.alert, fps=fps, cooldown_s=args.cooldown, budget_tokens=budget,
                                  policy=args.policy or "merge"))


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _events_table(rows: list) -> list[str]:
    """Logged events (EventSummary) as aligned lines: time, session, kind, stream time, question, answer, evidence."""
    header = ("logged", "session", "kind", "at", "question", "answer", "evidence")
    lines = []
    for r in rows:
        evidence = "-" if not r.evidence_frames else (
            f"{r.evidence_frames} frame{'s' if r.evidence_frames > 1 else ''} {_clock(r.evidence_span[0])}"
            + (f"-{_clock(r.evidence_span[1])}" if r.evidence_span[1] != r.evidence_span[0] else ""))
        lines.append((time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.wall_time)), _short(r.session, 24), r.kind,
                      _clock(r.stream_t) if r.stream_t is not None else "-", _short(r.question or "-", 40), _short(r.text or "-", 48), evidence))
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *lines]]


def _cmd_events(args: argparse.Namespace) -> int:
    from .server.eventlog import EventLog, parse_since, summarize

    since = parse_since(args.since) if args.since else None
    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    db = _events_db(args.db)
    if not db.exists():
        raise ConfigError(f"no event log at {db} (serve and watch write one; --db picks another file)")
    log = EventLog(db)
    try:
        events = log.list(since=since, session=args.session, limit=args.limit, newest_first=True)
    finally:
        log.close()
    if args.json:
        for event in events:
            print(json.dumps(event))
    elif not events:
        print("no events" + (" for this filter" if since is not None or args.session else ""), file=sys.stderr)
    else:
        print("\n".join(_events_table([summarize(e) for e in events])))
    return 0


def _cmd_fleet(args: argparse.Namespace) -> int:
    from .fleet.config import load_fleet_config

    config = load_fleet_config(args.config)  # every mistake in the file is reported before Ray starts
    if args.status:
        from .fleet.run import format_status, read_status

        rows, age_s = read_status(config)
        print("\n".join(json.dumps(r) for r in rows) if args.json else format_status(rows))
        if age_s > 10:
            print(f"streamvlm: this status is {age_s:.0f} s old: the fleet may have stopped", file=sys.stderr)
        return 0
    from .fleet.run import run_fleet
    from .watch import check_source

    for camera in config.cameras:
        check_source(camera.source)
    return run_fleet(config, duration_s=args.duration if args.duration is not None else config.duration_s)


def _cmd_bench_fleet(args: argparse.Namespace) -> int:
    from .bench.fleet import run_fleet_bench

    result = run_fleet_bench(model=args.model, alert_model=args.alert_model, cameras=args.cameras, seconds=args.seconds,
                             snapshot_every_s=args.snapshot_every, live=not args.no_live, live_seconds=args.live_seconds)
    _emit_json(result, args.json)
    if not result["passed"]:
        print(f"streamvlm: fleet bench failed: {result['alerts_lost']} alert(s) lost, {result['alerts_doubled']} doubled", file=sys.stderr)
    return 0 if result["passed"] else 1


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench.serve import run_serve_bench, run_serve_sweep

    try:  # "8" or "1,2,4,8"
        counts = [int(part) for part in args.sessions.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--sessions {args.sessions!r}: expected positive integers separated by commas, e.g. 1,2,4,8")
    engines = list(_split_names(args.engine)) or ["scheduler"]
    if len(counts) == 1 and len(engines) == 1:  # one run: the flat result, as before
        result = run_serve_bench(_model_config(args), sessions=counts[0], fps=args.fps, duration=args.duration, engine=engines[0],
                                 ask_together=args.ask_together)
    else:
        result = run_serve_sweep(_model_config(args), sessions=counts, engines=engines, fps=args.fps, duration=args.duration,
                                 ask_together=args.ask_together)
    return _emit_json(result, args.json)


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from .bench.soak import POSITIONS, run_soak_bench

    result = run_soak_bench(_model_config(args), sessions=args.sessions, frames=args.frames, seed=args.seed,
                            policies=_split_names(args.policies) or POLICIES, positions=_split_names(args.positions) or POSITIONS,
                            fps=args.fps, budget_tokens=args.budget, drain_timeout_s=args.drain_timeout, progress=not args.quiet)
    _emit_json(result, args.json)
    if not result["passed"]:
        print(f"streamvlm: soak failed: {result['engine_faults']} engine fault(s) (metric: {result['engine_faults_metric']}), "
              f"{result['lifecycle_violations']} lifecycle violation(s), threads {result['threads_before']} -> {result['threads_after']}",
              file=sys.stderr)
    return 0 if result["passed"] else 1


def _cmd_bench_storm(args: argparse.Namespace) -> int:
    from .bench.storm import run_storm_bench

    result = run_storm_bench(_model_config(args), messages=args.messages, churn=args.churn, watches=args.watches, questions=args.questions,
                             fps=args.fps, new_sessions=args.new_sessions, seed=args.seed, quiet_s=args.quiet_seconds,
                             settle_timeout_s=args.settle_timeout, progress=not args.quiet)
    _emit_json(result, args.json)
    if not result["passed"]:
        print(f"streamvlm: storm failed: {result['new_sessions_refused']} new session(s) refused, "
              f"{result['live']['unanswered']} live question(s) unanswered, {result['engine_faults']} engine fault(s)", file=sys.stderr)
    return 0 if result["passed"] else 1


def _split_names(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, unless its help text already names it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and every sub-command under it the help format that shows defaults."""
    parser.formatter_class = _HelpWithDefaults
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "default: %(default)s"
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamvlm", description="Watch live video with a vision-language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="play a video through the model as if live and answer timed questions")
    run.add_argument("video", nargs="?", help="video file (default: a generated 4 s clip)")
    run.add_argument("--model", default="tiny-smolvlm", help="preset, Hub id or local path (default: tiny-smolvlm, random weights)")
    run.add_argument("--fps", type=float, default=2.0, help="frames per second to read (by timestamp; default 2)")
    run.add_argument("--ask", action="append", metavar="'TIME: QUESTION'", help="a question at a stream time, e.g. '12s: what is on the board?'")
    run.add_argument("--fast", action="store_true", help="read as fast as possible instead of at real-time pace")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--seed", type=int, default=None)
    _add_precision_flags(run)
    run.add_argument("--system", default=None, help="system prompt")
    run.add_argument("--memory-budget", type=int, default=None, metavar="TOKENS", help="working-memory budget in tokens (default: unbounded, exact)")
    run.add_argument("--policy", default="window", help="what to compress or evict: window, infinipot, proxy-attention, merge")
    run.add_argument("--positions", default="keep", help="keep (original positions) or reindex (re-rotate to contiguous)")
    run.add_argument("--store-ram", default="256MB", help="long-term store quota in RAM (default 256MB)")
    run.add_argument("--store-disk", default="0", help="long-term store quota on disk, e.g. 20GB (default 0)")
    run.add_argument("--retrieve", type=int, default=MemoryConfig.retrieval_top_k, metavar="K",
                     help=f"stored chunks a question may bring back (0: off; default {MemoryConfig.retrieval_top_k}; more pays off under a small budget)")
    run.add_argument("--verbose", action="store_true", help="print memory events as they happen")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", help="a ShapeWorld stream through the shipped model at real time, answers checked")
    demo.add_argument("--model", default="shapeworld", help="default: the ShapeWorld model shipped in the package")
    demo.add_argument("--seed", type=int, default=7, help="episode seed (default 7, held out from training)")
    demo.add_argument("--duration", type=float, default=24.0, help="seconds of stream (default 24)")
    demo.add_argument("--fast", action="store_true", help="as fast as the model reads instead of real time")
    demo.add_argument("--no-draw", action="store_true", help="do not draw frames on the terminal")
    _add_precision_flags(demo)
    demo.set_defaults(func=_cmd_demo)

    check = sub.add_parser("check-model", help="check that streaming gives the logits of one offline prefill")
    check.add_argument("model", help="preset, Hub id or local path")
    check.add_argument("--frames", type=int, default=8)
    check.add_argument("--question", default="What happened in the video?")
    check.add_argument("--max-new-tokens", type=int, default=8)
    check.add_argument("--tolerance", type=float, default=None,
                       help="max absolute logit difference allowed in every dtype checked (default: 1e-4 in float32; in bfloat16 "
                            "and float16 4 units in the last place of the largest logit)")
    check.add_argument("--device", default="auto", help="auto (a CUDA GPU, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps "
                                                        "(default: auto)")
    check.add_argument("--dtype", default="float32,auto",
                       help="dtypes to check, comma-separated: float32, bfloat16, float16, auto (float32 always runs: it is the "
                            "reference each answer is compared with; default: float32,auto)")
    check.set_defaults(func=_cmd_check)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    lat = bench_sub.add_parser("latency", help="time to first token: streamed cache vs. re-reading every frame")
    lat.add_argument("--model", default="smolvlm-256m-random")
    lat.add_argument("--frames", default="16,64,128", help="stream lengths, comma-separated")
    lat.add_argument("--repeats", type=int, default=3, help="questions timed per stream length (median reported)")
    lat.add_argument("--json", metavar="OUT", help="write the result to this file")
    lat.add_argument("--quiet", action="store_true", help="no progress bar")
    lat.add_argument("--memory-budget", type=int, default=None, metavar="TOKENS", help="bound the streamed session's working memory")
    lat.add_argument("--no-naive", action="store_true", help="skip the re-reading baseline (minutes per count)")
    _add_precision_flags(lat)
    lat.set_defaults(func=_cmd_bench_latency)
    mem = bench_sub.add_parser("memory", help="working memory, store and RSS over a long stream under a token budget")
    mem.add_argument("--model", default="smolvlm-256m-random")
    mem.add_argument("--frames", type=int, default=1000, help="frames to stream")
    mem.add_argument("--policy", default="window", help="window, infinipot, proxy-attention or merge (default: window)")
    mem.add_argument("--budget", type=int, default=4096, help="working-memory budget in tokens (default 4096)")
    mem.add_argument("--store-ram", default="256MB", help="long-term store quota in RAM, e.g. 512MB or 2GB (default 256MB)")
    mem.add_argument("--store-disk", default="0", help="long-term store quota on disk, e.g. 2GB (default 0: none)")
    mem.add_argument("--sample-every", type=int, default=100, help="frames between samples (the last frame is always sampled)")
    mem.add_argument("--json", metavar="OUT", help="write the result to this file")
    mem.add_argument("--fast", action="store_true", help="accepted for symmetry with run: this benchmark always streams as fast as possible")
    mem.add_argument("--quiet", action="store_true", help="no progress bar")
    mem.add_argument("--plot", metavar="PNG", help="also draw the samples to this PNG file")
    _add_precision_flags(mem)
    mem.set_defaults(func=_cmd_bench_memory)

    ret = bench_sub.add_parser("retrieval", help="search latency of the long-term store at a model's layer sizes")
    ret.add_argument("--chunks", type=int, default=10_000, help="stored chunks (default 10000)")
    ret.add_argument("--layers", type=int, default=30, help="default: SmolVLM2-256M's 30 layers")
    ret.add_argument("--kv-heads", type=int, default=3)
    ret.add_argument("--q-heads", type=int, default=9)
    ret.add_argument("--head-dim", type=int, default=64)
    ret.add_argument("--top-k", type=int, default=MemoryConfig.retrieval_top_k, help=f"chunks fetched (default {MemoryConfig.retrieval_top_k}, the engine's)")
    ret.add_argument("--json", metavar="OUT", help="write the result to this file")
    ret.set_defaults(func=_cmd_bench_retrieval)

    live = bench_sub.add_parser("live", help="a synthetic camera at real time through the live worker")
    live.add_argument("--model", default="smolvlm-256m-random")
    live.add_argument("--fps", type=float, default=2.0)
    live.add_argument("--duration", type=float, default=60.0, help="seconds of video (played in real time)")
    live.add_argument("--budget", type=int, default=2048, help="working-memory budget in tokens")
    live.add_argument("--probe-every", type=int, default=2, help="probe watches every N ingested frames")
    _add_precision_flags(live)
    live.add_argument("--json", metavar="OUT", help="write the result to this file")
    live.set_defaults(func=_cmd_bench_live)

    qual = bench_sub.add_parser("quality", help="answer accuracy on held-out ShapeWorld episodes, and a memory sweep")
    qual.add_argument("--model", default="shapeworld", help="default: the shipped ShapeWorld model")
    qual.add_argument("--split", choices=("test", "validation", "train"), default="test",
                      help="episode seed split: test (figures to report; seeds 700000-799999), validation (every choice: "
                           "seeds 0-99999), train (default: test)")
    qual.add_argument("--episodes", type=int, default=96, help="episodes per configuration (default 96)")
    qual.add_argument("--duration", type=float, default=24.0, help="seconds per episode at 1 frame/s (default 24)")
    qual.add_argument("--seed", type=int, default=None,
                      help="first episode seed, inside --split (default: the split's first seed)")
    qual.add_argument("--budgets", default="50,25,10", help="the frames' share of working memory, %% of what they take with full memory (default 50,25,10)")
    qual.add_argument("--policies", default=",".join(POLICIES), help="memory policies to sweep, comma-separated (default: all)")
    qual.add_argument("--top-k", type=int, default=MemoryConfig.retrieval_top_k,
                      help=f"stored chunks a question brings back when retrieval is on (default {MemoryConfig.retrieval_top_k}, the engine's)")
    qual.add_argument("--no-sweep", action="store_true", help="full memory only")
    qual.add_argument("--episode-seconds", type=float, default=None, metavar="S",
                      help="long episodes of S seconds at 1 frame/s where memory matters (events spread out, things coming back, "
                           "questions a minute or more after their moment; positions re-indexed under a budget), e.g. 300")
    qual.add_argument("--rates", default="", metavar="FPS,...",
                      help="also measure alerts with the same episodes streamed at these frame rates, e.g. 1,2,10")
    qual.add_argument("--read-fps", type=float, default=DEFAULT_READ_FPS, metavar="FPS",
                      help="frames read per second of each --rates stream, as `watch --fps` reads a camera (default "
                           f"{DEFAULT_READ_FPS:g}, watch's default; 0: every frame)")
    qual.add_argument("--positions", choices=("keep", "reindex"), default="keep", help="working-memory positions under a budget (default keep)")
    qual.add_argument("--answer-format", choices=("auto", "text", "time"), default="auto",
                      help="auto (default): time answers decoded as one MM:SS clock; text: free decoding")
    qual.add_argument("--deferred-time", choices=("evidence", "model"), default="evidence",
                      help="evidence (default): a deferred answer's time lies within the evidence its rule fired on, as "
                           "the server says it; model: any time up to the answer's moment, the model's own choice")
    qual.add_argument("--json", metavar="OUT", help="write the result to this file")
    qual.add_argument("--plot", metavar="PNG", help="draw accuracy against budget for every policy to this PNG")
    qual.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_precision_flags(qual)
    qual.set_defaults(func=_cmd_bench_quality)

    bfleet = bench_sub.add_parser("fleet", help="camera actors on a local Ray cluster of 1 and 2 nodes: frames/s, recovery after a kill")
    bfleet.add_argument("--model", default="tiny-smolvlm", help="model of the throughput run")
    bfleet.add_argument("--alert-model", default="shapeworld", help="model of the recovery runs (its alerts are compared)")
    bfleet.add_argument("--cameras", type=int, default=2, help="camera actors in the throughput run")
    bfleet.add_argument("--seconds", type=float, default=120.0, help="length of the ShapeWorld clip (1 frame/s) every camera reads")
    bfleet.add_argument("--live-seconds", type=float, default=20.0, help="length of the clip of the camera paced in real time")
    bfleet.add_argument("--snapshot-every", type=float, default=20.0, help="stream seconds between snapshots")
    bfleet.add_argument("--no-live", action="store_true", help="skip the recovery of a camera paced in real time")
    bfleet.add_argument("--json", metavar="OUT", help="write the result to this file")
    bfleet.set_defaults(func=_cmd_bench_fleet)

    bserve = bench_sub.add_parser("serve", help="concurrent realtime sessions against one server")
    bserve.add_argument("--model", default="tiny-smolvlm")
    bserve.add_argument("--sessions", default="8", help="session count, or several to compare: 1,2,4,8 (default: 8)")
    bserve.add_argument("--engine", default="scheduler", help="scheduler, lock (the previous mode: turns on one lock), "
                                                             "or both to compare: lock,scheduler (default: scheduler)")
    bserve.add_argument("--fps", type=float, default=2.0)
    bserve.add_argument("--duration", type=float, default=30.0)
    bserve.add_argument("--ask-together", action="store_true",
                        help="every session asks at the same moment (many users at once) instead of staggered")
    bserve.add_argument("--json", metavar="OUT", help="write the result to this file")
    _add_precision_flags(bserve)
    bserve.set_defaults(func=_cmd_bench_serve)

    soak = bench_sub.add_parser("soak", help="many sessions, long accelerated streams, random questions, cancels, watches and resumes")
    soak.add_argument("--model", default="tiny-smolvlm")
    soak.add_argument("--sessions", type=int, default=4, help="client sessions at once (default 4)")
    soak.add_argument("--frames", type=int, default=3000, help="frames each session slot sends (default 3000)")
    soak.add_argument("--seed", type=int, default=0, help="seed of the random client behaviour (default 0)")
    soak.add_argument("--policies", default=None, help="memory policies, comma-separated (default: all)")
    soak.add_argument("--positions", default=None, help="position strategies, comma-separated (default: keep,reindex)")
    soak.add_argument("--fps", type=float, default=60.0, help="the server's frame-rate limit; frames are sent just under it (default 60)")
    soak.add_argument("--budget", type=int, default=256, help="working-memory budget per session in tokens (default 256)")
    soak.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the last answers of a session")
    soak.add_argument("--json", metavar="OUT", help="write the result to this file")
    soak.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_precision_flags(soak)
    soak.set_defaults(func=_cmd_bench_soak)

    storm = bench_sub.add_parser("storm", help="a live session's answer time and the server's memory while hostile clients attack")
    storm.add_argument("--model", default="tiny-smolvlm")
    storm.add_argument("--messages", type=int, default=10_000, help="hostile messages in all (default 10000)")
    storm.add_argument("--churn", type=int, default=100, help="rapid connect/disconnects (default 100)")
    storm.add_argument("--watches", type=int, default=1000, help="watch.create sent by one hostile session (default 1000)")
    storm.add_argument("--questions", type=int, default=8, help="live questions timed before and during the storm (default 8)")
    storm.add_argument("--fps", type=float, default=5.0, help="the live session's frame rate (default 5)")
    storm.add_argument("--quiet-seconds", type=float, default=20.0,
                       help="how long the live session is timed before the storm and again after it (default 20)")
    storm.add_argument("--settle-timeout", type=float, default=120.0,
                       help="the most seconds to wait, before timing, for the live session's memory to reach its budget (default 120)")
    storm.add_argument("--new-sessions", type=int, default=3, help="fresh sessions that must be admitted after the storm (default 3)")
    storm.add_argument("--seed", type=int, default=0)
    storm.add_argument("--json", metavar="OUT", help="write the result to this file")
    storm.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_precision_flags(storm)
    storm.set_defaults(func=_cmd_bench_storm)

    srv = sub.add_parser("serve", help="serve the realtime WebSocket API and the web client")
    srv.add_argument("--model", default="tiny-smolvlm", help="shapeworld, a preset, Hub id or local path (default: tiny-smolvlm, random weights: answers are noise)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs --token)")
    srv.add_argument("--port", type=int, default=8765)
    srv.add_argument("--token", default=None, help="bearer token clients must present")
    srv.add_argument("--allowed-origin", action="append", help="extra browser origin allowed to connect (repeatable)")
    srv.add_argument("--allowed-host", action="append", metavar="NAME[:PORT]",
                     help="a name clients reach the server by (Host header; repeatable). Loopback names and a specific "
                          "--host are always allowed; with --host 0.0.0.0 list the names clients use")
    srv.add_argument("--max-sessions", type=int, default=8)
    srv.add_argument("--session-budget", type=int, default=4096, help="working-memory tokens per session")
    srv.add_argument("--global-budget", type=int, default=8 * 4096, help="working-memory tokens across sessions")
    srv.add_argument("--max-session-budget", type=int, default=16384,
                     help="most working-memory tokens a client may ask for one session (session.update)")
    srv.add_argument("--max-parked", type=int, default=16,
                     help="sessions kept for their client to resume; the oldest ends first when a live one needs room")
    srv.add_argument("--max-watches", type=int, default=32, help="watches one session may hold")
    srv.add_argument("--max-open-responses", type=int, default=ServerConfig.max_open_responses,
                     help="responses one session may have open at once (answering, queued or waiting for their condition)")
    srv.add_argument("--engine", choices=("scheduler", "lock"), default="scheduler",
                     help="scheduler: frames of all sessions batched, read rates capped evenly when the model is saturated; "
                          "lock: one frame per forward, no caps (the previous mode)")
    srv.add_argument("--frame-time-share", type=float, default=0.8,
                     help="the most of the model's time frame reads may take before read rates are capped; they get less "
                          "when answers and probes use more (measured)")
    srv.add_argument("--store-ram", default="64MB", help="each session's long-term store in RAM (default 64MB)")
    srv.add_argument("--store-disk", default="0", help="each session's long-term store on disk beyond that, e.g. 2GB "
                     "(default 0: chunks past the RAM quota are dropped)")
    srv.add_argument("--resume-window", type=float, default=60.0, help="seconds a dropped session can be resumed")
    srv.add_argument("--event-db", default=None, help="SQLite event log (default: $STREAMVLM_HOME/events.db)")
    srv.add_argument("--ice-server", action="append", metavar="URL", help="STUN/TURN server for WebRTC peers off this machine (repeatable)")
    srv.add_argument("--snapshot-dir", default=None, metavar="PATH",
                     help="directory for session snapshots: a session resumes after a restart, or on any server or Ray "
                          "replica sharing it (required with --ray)")
    srv.add_argument("--snapshot-every", type=float, default=10.0, metavar="S",
                     help="seconds between snapshots of a connected session (default 10; 0: only when its client "
                          "leaves and when the server stops)")
    srv.add_argument("--ray", action="store_true", help="serve as a Ray Serve application: --replicas copies of the "
                     "model, sessions resumable on any replica (docs/deployment.md)")
    srv.add_argument("--replicas", type=int, default=None, help="with --ray: replicas, each loading the model (default 1)")
    srv.add_argument("--gpus-per-replica", type=float, default=None, help="with --ray: GPUs each replica reserves (default 0)")
    srv.add_argument("--ray-address", default=None, help="with --ray: the cluster to join (default: $RAY_ADDRESS, else a "
                     "new local one)")
    _add_precision_flags(srv)
    srv.set_defaults(func=_cmd_serve)

    wat = sub.add_parser("watch", help="monitor one camera or many (RTSP/HTTP/file/webcam index) with one model and raise alerts")
    wat.add_argument("source", nargs="*", help="rtsp://..., http://..., a file, or a webcam index like 0; several: one model reads them all")
    wat.add_argument("--source", dest="more_sources", action="append", metavar="SOURCE", help="one more camera (repeatable)")
    wat.add_argument("--config", default=None, metavar="TOML", help="cameras from a file: per-camera name, source, alerts, "
                                                                     "questions, fps, cooldown, budget, policy (see demos/cameras.toml)")
    wat.add_argument("--alert", action="append", metavar="CONDITION", help='a condition to alert on, e.g. "a person falls" (repeatable; every camera)')
    wat.add_argument("--model", default=None, help="preset, Hub id or local path (default: the --config file's model, else tiny-smolvlm)")
    wat.add_argument("--webhook", default=None, help="POST every alert here (retried; the backlog survives restarts)")
    wat.add_argument("--log", default=None, metavar="JSONL", help="append every event to this JSON-lines file")
    wat.add_argument("--event-db", default=None, help="SQLite event log (default: $STREAMVLM_HOME/events.db)")
    wat.add_argument("--memory-budget", type=int, default=None, help="working-memory tokens per camera (default 4096)")
    wat.add_argument("--policy", default=None, help="memory policy (default merge: static cameras cost little)")
    wat.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until every source ends)")
    wat.add_argument("--name", default=None, help="this run's session name in the event log (default: a fresh watch_... id)")
    wat.add_argument("--fps", type=float, default=None,
                     help="frames read per second from each source (default 2; 0: every frame it delivers); the alert "
                          "rules count seconds, not frames")
    wat.add_argument("--cooldown", type=float, default=None,
                     help="seconds of stream time between two alerts of the same condition (default 0: none)")
    _add_precision_flags(wat)  # with --config: the file's device and dtype apply where these are left at auto
    wat.set_defaults(func=_cmd_watch)

    evs = sub.add_parser("events", help="list logged answers and alerts, newest first")
    evs.add_argument("--since", default=None, help="only events after this: a duration back from now (90s, 10m, 2h, 1d), "
                                                   "an ISO time (2026-03-01T14:30) or a Unix time (default: all)")
    evs.add_argument("--session", default=None, help="only this session (serve: its session id; watch: its --name or printed id)")
    evs.add_argument("--limit", type=int, default=50, help="the newest N events")
    evs.add_argument("--json", action="store_true", help="one raw JSON object per line (the whole logged payload) instead of a table")
    evs.add_argument("--db", default=None, help="SQLite event log (default: $STREAMVLM_HOME/events.db)")
    evs.set_defaults(func=_cmd_events)

    flt = sub.add_parser("fleet", help="run cameras as restartable Ray actors that resume from snapshots (see docs/fleet.md)")
    flt.add_argument("config", metavar="TOML", help="the cameras file of watch --config plus a [fleet] table (snapshot_dir, ...)")
    flt.add_argument("--status", action="store_true", help="print the running fleet's cameras (node, frames, last alert, restarts) and exit")
    flt.add_argument("--json", action="store_true", help="with --status: one JSON object per camera")
    flt.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: the file's, else when every source ends)")
    flt.set_defaults(func=_cmd_fleet)
    return _show_defaults(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StreamVLMError as exc:
        print(f"streamvlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
