"""Getting frames into streamvlm: reading video files and sampling them by time."""

from __future__ import annotations

from streamvlm.ingest.file import VideoInfo, probe_video, read_video, write_test_clip
from streamvlm.ingest.live import LiveSource, SourceConfig, SourceEvent, SourceRefusedError
from streamvlm.ingest.sampler import FpsSampler

__all__ = ["LiveSource", "SourceConfig", "SourceEvent", "SourceRefusedError", "FpsSampler", "VideoInfo", "probe_video", "read_video", "write_test_clip"]
