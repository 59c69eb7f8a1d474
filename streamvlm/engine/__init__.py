"""The engine: a runner that owns tensors and a session that decides what is fed when."""

from .runner import Preempted, Runner, StepTimes
from .session import AnswerStream, EncodedFrame, IngestResult, StreamSession

__all__ = ["Runner", "StepTimes", "Preempted", "StreamSession", "AnswerStream", "IngestResult", "EncodedFrame"]
