"""The engine: a runner that owns tensors and a session that decides what is fed when."""

from .runner import Runner, StepTimes
from .session import AnswerStream, IngestResult, StreamSession

__all__ = ["Runner", "StepTimes", "StreamSession", "AnswerStream", "IngestResult"]
