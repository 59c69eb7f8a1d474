"""The one exception tree of streamvlm.

Everything the package raises on purpose derives from :class:`StreamVLMError`, so a caller can catch
that one class at a boundary (a CLI command, a protocol handler) and turn it into a message::

    StreamVLMError
    ├── ConfigError          a setting has an invalid value (also a ValueError)
    ├── InputError           data handed in is malformed; the session is unchanged (also a ValueError)
    │   ├── FrameError       a frame of the wrong shape, dtype or size
    │   ├── QuestionError    an empty or over-long question
    │   └── TimestampError   a timestamp that is not finite or goes backwards
    ├── ModelError           a checkpoint cannot be found, loaded or is of an unsupported family
    ├── SourceError          a video source cannot be opened or read
    │   └── SourceRefusedError   a network source keeps refusing (HTTP/RTSP 401, 403, 404, ...)
    ├── CapacityError        the context would outgrow what the model or the budget allows
    └── SessionBrokenError   an earlier fault left the session unusable (``reason`` says which step)

An :class:`InputError` never leaves a session half-changed: fix the input and call again.
"""

from __future__ import annotations

__all__ = [
    "StreamVLMError",
    "ConfigError",
    "InputError",
    "FrameError",
    "QuestionError",
    "TimestampError",
    "ModelError",
    "SourceError",
    "SourceRefusedError",
    "CapacityError",
    "SessionBrokenError",
]


class StreamVLMError(Exception):
    """Base class for every error raised by streamvlm."""


class ConfigError(StreamVLMError, ValueError):
    """A setting or argument has an invalid value; the message names it and what is allowed."""


class InputError(StreamVLMError, ValueError):
    """Data handed to streamvlm is malformed. Nothing was changed; correct the input and retry."""


class FrameError(InputError):
    """A frame is not an HxWx3 uint8 RGB image of a usable size."""


class QuestionError(InputError):
    """A question is empty or longer than the configured limit."""


class TimestampError(InputError):
    """A timestamp is not finite, or goes backwards relative to what the stream has already seen."""


class ModelError(StreamVLMError):
    """A model cannot be loaded: unknown id or path, unsupported architecture, or broken files."""


class SourceError(StreamVLMError):
    """A video source cannot be opened or read."""


class SourceRefusedError(SourceError):
    """A network source answered, several times in a row, with an error that retrying cannot change.

    ``status`` is the HTTP or RTSP status (e.g. 401, 403, 404) and ``url`` the URL without credentials;
    the message names both. Fix the URL or the credentials and start a new source.
    """

    def __init__(self, message: str, *, url: str, status: int) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class CapacityError(StreamVLMError):
    """The context would exceed the model's maximum position or the configured budget."""


class SessionBrokenError(StreamVLMError):
    """The session was left unusable by an earlier fault; ``reason`` says which step failed and how.

    Raised by every call on a session whose ``StreamSession.broken`` is set. Close the session (its
    store files are released) and start a new one; nothing else will make it usable again.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the session can no longer be used: {reason}")
        self.reason = reason
