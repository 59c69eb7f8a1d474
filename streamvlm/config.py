"""Settings, one small frozen dataclass per concern, each checked when it is built.

An invalid value raises :class:`~streamvlm.errors.ConfigError` naming the field and what it accepts,
so a typo fails at start-up rather than minutes into a stream.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["streamvlm_home", "parse_size", "ServerConfig", "ModelConfig", "SamplingConfig", "SessionConfig", "IngestConfig", "MemoryConfig", "POLICIES"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse a byte size such as ``2GB``, ``512MB``, ``1.5GiB``, ``64k`` or ``100000`` (bytes).

    Units are binary and case-insensitive (``1MB`` = ``1MiB`` = 2**20 bytes, matching the 256 MiB
    default of ``MemoryConfig.store_ram_bytes``). Raises :class:`ConfigError` naming ``what`` for
    anything else (empty, negative, unknown unit).
    """
    match = _SIZE.match(text) if isinstance(text, str) else None
    unit = match.group("unit").lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"{what} {text!r}: expected a size in bytes like 100000, 512MB or 2GB")
    return int(float(match.group("number")) * _UNITS[unit])



def streamvlm_home() -> Path:
    """Where streamvlm keeps presets and the event log: ``$STREAMVLM_HOME``, default ``~/.cache/streamvlm``."""
    return Path(os.environ.get("STREAMVLM_HOME", Path.home() / ".cache" / "streamvlm"))


_DTYPES = ("float32", "bfloat16", "float16", "auto")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(?::\d+)?)$")


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _finite_positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and how.

    ``model`` is a preset name (``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``, ``tiny-smolvlm``,
    ``smolvlm-256m-random``), a Hub id (``Qwen/Qwen2.5-VL-3B-Instruct``) or a local directory.
    ``device`` is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``dtype`` is the weights' dtype
    (``float32``, ``bfloat16``, ``float16``) or ``auto``. ``auto`` follows the rule of
    :func:`streamvlm.models.device.choose_precision` (the first CUDA GPU, else MPS, else the CPU; bf16
    where the hardware has it natively, float32 elsewhere); the commands default to ``auto``. This
    dataclass defaults to float32 on the CPU: exact, and what the exactness checks compare against.
    """

    model: str = "tiny-smolvlm"
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _require(bool(self.model and self.model.strip()), "model", "must name a preset, Hub id or path")
        _require(self.dtype in _DTYPES, "dtype", f"must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        _require(isinstance(self.device, str) and bool(_DEVICE.match(self.device)), "device",
                 f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _require(self.attn_implementation in ("sdpa", "eager"), "attn_implementation", "must be 'sdpa' or 'eager'")


@dataclass(frozen=True)
class SamplingConfig:
    """How answers are decoded.

    ``temperature == 0`` is greedy (the default, deterministic). With ``temperature > 0`` tokens are
    sampled, optionally restricted by ``top_k`` (0 = off) and ``top_p`` (1.0 = off); ``seed`` makes
    sampling repeatable. Generation stops at the model's end-of-turn token or after ``max_new_tokens``.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens", "must be an integer >= 1")
        _require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SessionConfig:
    """One stream's conversation settings and input limits.

    ``system_prompt`` opens the context. Frames smaller than ``min_frame_side`` or larger than
    ``max_frame_side`` pixels on a side are refused with a FrameError; questions longer than
    ``max_question_chars`` with a QuestionError.
    """

    system_prompt: str = "You are a helpful assistant watching a live video. Answer briefly about what you see."
    sampling: SamplingConfig = SamplingConfig()
    min_frame_side: int = 8
    max_frame_side: int = 4096
    max_question_chars: int = 4000

    def __post_init__(self) -> None:
        _require(isinstance(self.sampling, SamplingConfig), "sampling", "must be a SamplingConfig")
        _require(1 <= self.min_frame_side <= self.max_frame_side, "min_frame_side", "must be >= 1 and <= max_frame_side")
        _require(self.max_question_chars >= 1, "max_question_chars", "must be >= 1")


@dataclass(frozen=True)
class IngestConfig:
    """How a file or camera is turned into frames.

    ``fps`` is the target sampling rate by timestamp; ``realtime`` paces a file at its own speed
    (as a live camera would deliver it) instead of as fast as the model can read.
    """

    fps: float = 1.0
    realtime: bool = True

    def __post_init__(self) -> None:
        _require(_finite_positive(self.fps), "fps", f"must be a finite number > 0, got {self.fps!r}")


POLICIES = ("window", "infinipot", "proxy-attention", "merge")
_POSITIONS = ("keep", "reindex")


@dataclass(frozen=True)
class MemoryConfig:
    """The working-memory budget and what happens to what does not fit.

    ``budget_tokens`` is the hard cap on tokens the model attends to (None: unbounded, nothing is ever
    compressed and streaming stays exact). Dialogue (questions and answers) has its own cap,
    ``text_budget_tokens`` (default: a quarter of the budget); frames get the rest after the system
    prompt. Always kept: the system prompt, the last ``recent_frames`` frames and the last
    ``recent_turns`` question/answer turns. ``policy`` picks what to compress or evict (see
    ``streamvlm.memory.policies``); ``keep_ratio`` is the share of a frame's tokens a compressing
    policy keeps; ``merge_similarity`` the cosine similarity above which ``merge`` folds a frame into
    the previous one. ``positions`` is ``keep`` (original positions, gaps allowed, rebased when
    they pass half the model's range) or ``reindex`` (kept chunks re-rotated to contiguous positions
    after every eviction). Evicted chunks go to a long-term store with ``store_ram_bytes`` in RAM and
    ``store_disk_bytes`` on disk under ``store_dir`` (a temporary directory when None); a question
    brings back the ``retrieval_top_k`` most relevant ones (0 disables retrieval).
    """

    budget_tokens: int | None = None
    text_budget_tokens: int | None = None
    recent_frames: int = 2
    recent_turns: int = 1
    policy: str = "window"
    keep_ratio: float = 0.5
    merge_similarity: float = 0.98
    positions: str = "keep"
    store_ram_bytes: int = 256 * 2**20
    store_disk_bytes: int = 0
    store_dir: str | None = None
    # Chosen on validation (docs/benchmarks.md, "Retrieval depth"): at a 10 % budget, 12 chunks answered
    # backward questions best (4: 85 % of full memory, 8: 92 %, 12: 97 %, 16: 95 %).
    retrieval_top_k: int = 12

    def __post_init__(self) -> None:
        if self.budget_tokens is not None:
            _require(isinstance(self.budget_tokens, int) and self.budget_tokens >= 16, "budget_tokens", "must be an integer >= 16 or None")
        if self.text_budget_tokens is not None:
            _require(isinstance(self.text_budget_tokens, int) and self.text_budget_tokens >= 0, "text_budget_tokens", "must be an integer >= 0")
            if self.budget_tokens is not None:
                _require(self.text_budget_tokens < self.budget_tokens, "text_budget_tokens", "must be smaller than budget_tokens")
        _require(isinstance(self.recent_frames, int) and self.recent_frames >= 1, "recent_frames", "must be an integer >= 1")
        _require(isinstance(self.recent_turns, int) and self.recent_turns >= 0, "recent_turns", "must be an integer >= 0")
        _require(self.policy in POLICIES, "policy", f"must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        _require(0 < self.keep_ratio < 1, "keep_ratio", "must be in (0, 1)")
        _require(0 < self.merge_similarity <= 1, "merge_similarity", "must be in (0, 1]")
        _require(self.positions in _POSITIONS, "positions", f"must be one of {', '.join(_POSITIONS)}")
        _require(self.store_ram_bytes >= 0 and self.store_disk_bytes >= 0, "store_ram_bytes", "quotas must be >= 0 bytes")
        _require(isinstance(self.retrieval_top_k, int) and self.retrieval_top_k >= 0, "retrieval_top_k", "must be an integer >= 0")

    @property
    def bounded(self) -> bool:
        return self.budget_tokens is not None

    @property
    def text_budget(self) -> int | None:
        if self.budget_tokens is None:
            return None
        return self.text_budget_tokens if self.text_budget_tokens is not None else self.budget_tokens // 4


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_HOST_ENTRY = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?)(?::(?P<port>\d{0,5}))?", re.ASCII)


def _host_entry_ok(entry: object) -> bool:
    """An ``allowed_hosts`` entry: a name or IPv4 address, ``[IPv6]`` or a bare IPv6 address, optionally ``:port``."""
    if not isinstance(entry, str):
        return False
    match = _HOST_ENTRY.fullmatch(f"[{entry}]" if entry.count(":") >= 2 and not entry.startswith("[") else entry)
    if match is None or int(match["port"] or 0) > 65535:
        return False
    try:
        if match["v6"] is not None:
            ipaddress.IPv6Address(match["v6"])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ServerConfig:
    """The WebSocket server: where it listens, who may connect, and how much it takes on.

    Binding anywhere but loopback requires a ``token`` (sent as ``Authorization: Bearer ...`` or, from
    a browser, ``?access_token=...``). Browser connections (with an ``Origin`` header) must come from
    an allowed host (below) or be one of ``allowed_origins``. Every request but ``/healthz`` must
    name an allowed host in its ``Host`` header (DNS rebinding): the loopback names (``localhost``,
    ``127.0.0.1``, ``[::1]``, any port), ``host`` unless it binds every address (``0.0.0.0``, ``::``),
    and each of ``allowed_hosts`` (``name`` for any port, ``name:port`` for one); a server bound to
    ``0.0.0.0`` needs the names its clients use there. At most ``max_sessions`` sessions run at
    once (parked sessions, waiting for their client to resume, never block a live one: the oldest is
    ended to make room, and at most ``max_parked_sessions`` are kept), each starting with a
    working-memory budget of ``session_budget_tokens`` (a client may ask for up to
    ``max_session_budget_tokens``, never unbounded, at most ``max_watches`` watches and at most
    ``max_open_responses`` responses open at once; its long-term
    store holds ``session_store_ram_bytes`` in RAM and ``session_store_disk_bytes`` on disk) under a global cap of
    ``global_budget_tokens``; a session left by its client can be resumed for ``resume_window_s``.
    ``max_session_s`` (None: unlimited) ends sessions after that long, with a ``session.go_away``
    ``go_away_notice_s`` before. Events (answers, alerts) are logged to SQLite at ``event_db``.

    ``engine`` picks how sessions share the model: ``scheduler`` (the default: batched reads across
    sessions, and admission by compute, which caps each session's frame read rate evenly once the
    sessions offer more frames than the model reads in what answers and probes leave of its time
    (measured; at most ``frame_time_share``)) or ``lock`` (the previous mode: sessions take turns on one lock, no
    batching, no admission; kept to compare against).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # extra Host names clients may use ("name" or "name:port"), see above
    max_sessions: int = 8
    session_budget_tokens: int = 4096
    max_session_budget_tokens: int = 16384
    max_parked_sessions: int = 16
    max_watches: int = 32
    max_open_responses: int = 16  # responses one session may have open at once (answering, queued or deferred)
    session_store_ram_bytes: int = 64 * 2**20  # each session's long-term store in RAM (older chunks beyond it spill or drop)
    session_store_disk_bytes: int = 0  # each session's long-term store on disk (0: chunks past the RAM quota are dropped)
    global_budget_tokens: int = 8 * 4096
    resume_window_s: float = 60.0
    max_session_s: float | None = None
    go_away_notice_s: float = 10.0
    event_db: str | None = None
    stats_every_s: float = 2.0
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs for WebRTC peers beyond this machine (none needed on localhost)
    engine: str = "scheduler"  # "scheduler" (batched reads, admission by compute) or "lock" (turns on one lock), see above
    frame_time_share: float = 0.8  # the most of the model's time frames may take under admission by compute, (0, 1]

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", "must be 0..65535")
        _require(self.host in _LOOPBACK or bool(self.token), "token",
                 f"a token is required to bind to {self.host!r}; pass --token or bind to 127.0.0.1")
        for entry in self.allowed_hosts:
            _require(_host_entry_ok(entry), "allowed_hosts",
                     f"{entry!r} is not a host name or address with an optional :port (e.g. 'cam.example:8765')")
        _require(self.max_sessions >= 1, "max_sessions", "must be >= 1")
        _require(self.session_budget_tokens >= 16, "session_budget_tokens", "must be >= 16")
        _require(self.max_session_budget_tokens >= self.session_budget_tokens, "max_session_budget_tokens",
                 "must be >= session_budget_tokens")
        _require(self.max_parked_sessions >= 0, "max_parked_sessions", "must be >= 0")
        _require(self.max_watches >= 1, "max_watches", "must be >= 1")
        _require(self.max_open_responses >= 1, "max_open_responses", "must be >= 1")
        _require(self.session_store_ram_bytes >= 0 and self.session_store_disk_bytes >= 0, "session_store_ram_bytes",
                 "store quotas must be >= 0 bytes")
        _require(self.global_budget_tokens >= self.session_budget_tokens, "global_budget_tokens", "must be >= session_budget_tokens")
        _require(self.resume_window_s >= 0, "resume_window_s", "must be >= 0")
        _require(self.max_session_s is None or self.max_session_s > 0, "max_session_s", "must be > 0 or None")
        _require(self.stats_every_s > 0, "stats_every_s", "must be > 0")
        _require(self.engine in ("lock", "scheduler"), "engine", f"must be 'scheduler' or 'lock', got {self.engine!r}")
        _require(isinstance(self.frame_time_share, (int, float)) and not isinstance(self.frame_time_share, bool)
                 and math.isfinite(self.frame_time_share) and 0 < self.frame_time_share <= 1, "frame_time_share",
                 f"must be a number in (0, 1] (the share of the model's time frames may take), got {self.frame_time_share!r}")
