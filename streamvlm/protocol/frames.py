"""Video frames on the wire: the binary frame message, image decoding, the limits and the protocol error.

A binary WebSocket message carries one frame: a 16-byte little-endian header, the source id, then a
JPEG or PNG image::

    offset  size  field
    0       4     magic            b"SVF1"
    4       1     version          uint8, 1
    5       1     flags            uint8, 0 (reserved)
    6       2     source_id_len    uint16, bytes of UTF-8 that follow the header
    8       8     pts_s            float64 seconds on the client's clock; NaN = stamp it with the server's clock
    16      n     source_id        UTF-8, 1..128 printable characters
    16+n    rest  image            a JPEG or PNG file

Build one with :func:`encode_frame`; the server reads it with :func:`decode_frame`. Every rejection
is a :class:`ProtocolError` (an :class:`~streamvlm.errors.InputError`) whose ``code`` says what to
fix. This module has no clock, no event loop and no network: bytes in, arrays out.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

from ..errors import ConfigError, InputError
from ..types import Frame

__all__ = [
    "FRAME_MAGIC",
    "FRAME_VERSION",
    "FRAME_HEADER",
    "MAX_SOURCE_ID_CHARS",
    "Limits",
    "ProtocolError",
    "DecodedFrame",
    "encode_frame",
    "decode_frame",
    "decode_image",
    "image_size",
    "check_source_id",
]

#: First four bytes of every binary frame message.
FRAME_MAGIC = b"SVF1"
#: The binary frame layout version this module reads and writes.
FRAME_VERSION = 1
#: magic, version, flags, source_id length, pts_s: little-endian, 16 bytes.
FRAME_HEADER = struct.Struct("<4sBBHd")
#: Longest accepted ``source_id``, in characters.
MAX_SOURCE_ID_CHARS = 128

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


class ProtocolError(InputError):
    """A client message was refused; the session is unchanged and goes on.

    ``code`` is the machine-readable reason (see ``ERROR_CODES`` in :mod:`.messages` and
    docs/protocol.md), ``param`` the offending field as a path such as ``"item.content[0].text"``
    (None when the whole message is at fault), ``client_event_id`` the ``event_id`` of the client
    event it answers (None when unknown). A server turns it into an ``error`` event with
    :func:`~streamvlm.protocol.messages.error_event`; a client fixes the message and sends it again.
    """

    def __init__(self, code: str, message: str, param: str | None = None, client_event_id: str | None = None) -> None:
        super().__init__(message if param is None else f"{param}: {message}")
        # Machine-readable reason, e.g. "invalid_value".
        self.code = code
        # Human-readable reason, without the param prefix.
        self.detail = message
        # Path of the offending field, or None.
        self.param = param
        # The client's event_id, echoed back in the error event; None when absent or unreadable.
        self.client_event_id = client_event_id

    def with_event_id(self, client_event_id: str | None) -> ProtocolError:
        """The same error answering ``client_event_id``, for re-raising once the event id is known."""
        return ProtocolError(self.code, self.detail, self.param, client_event_id)


@dataclass(frozen=True)
class Limits:
    """What one connection accepts; checked when built (:class:`~streamvlm.errors.ConfigError`).

    Pass one to :class:`~streamvlm.protocol.connection.Connection` and to the parsers; announce it
    to the client in ``session.created`` (:meth:`to_dict`) so it can size its frames.
    """

    # Largest text or binary WebSocket message, in bytes (UTF-8 bytes for text); larger: message_too_large.
    max_message_bytes: int = 4 * 2**20
    # Largest encoded JPEG/PNG image in a frame, in bytes; larger: frame_too_large.
    max_frame_bytes: int = 2 * 2**20
    # Largest image width or height, in pixels; larger: frame_too_large.
    max_frame_side: int = 4096
    # Smallest image width or height, in pixels; smaller: invalid_frame.
    min_frame_side: int = 8
    # Longest text field (instructions, a message's text, a watch condition), in characters.
    max_text_chars: int = 4000
    # Sustained frames per second accepted, with bursts of up to this many; beyond: rate_limited.
    max_frames_per_s: float = 30.0
    # Sustained messages per second of any kind (frames included), bursts of twice that; beyond: rate_limited.
    max_messages_per_s: float = 200.0
    # Refused messages (errors) a connection may cause: bursts of max_error_burst, then this many per second
    # sustained; beyond, the connection is closed with too_many_errors (it is spending the server's time).
    max_errors_per_s: float = 2.0
    max_error_burst: int = 50

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")

        for name in ("max_message_bytes", "max_frame_bytes", "max_frame_side", "min_frame_side", "max_text_chars",
                     "max_error_burst"):
            positive_int(name)
        if self.max_frame_bytes > self.max_message_bytes:
            raise ConfigError(f"max_frame_bytes: must be <= max_message_bytes ({self.max_message_bytes}), "
                              f"got {self.max_frame_bytes}")
        if self.min_frame_side > self.max_frame_side:
            raise ConfigError(f"min_frame_side: must be <= max_frame_side ({self.max_frame_side}), "
                              f"got {self.min_frame_side}")
        for name in ("max_frames_per_s", "max_messages_per_s", "max_errors_per_s"):
            rate = getattr(self, name)
            if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0):
                raise ConfigError(f"{name}: must be a finite number > 0, got {rate!r}")

    def to_dict(self) -> dict[str, int | float]:
        """The limits as a JSON-ready dict, as sent in ``session.created``."""
        return asdict(self)


@dataclass(frozen=True, eq=False)
class DecodedFrame:
    """A frame read off the wire.

    Hand it to the engine with :meth:`to_frame`, giving the server's clock for frames sent without a
    timestamp.
    """

    # HxWx3 uint8 RGB image.
    image: np.ndarray
    # Presentation time in seconds on the client's clock, or None: stamp it with the server's clock.
    pts_s: float | None
    # The camera or stream it came from.
    source_id: str

    def to_frame(self, server_now_s: float) -> Frame:
        """A :class:`~streamvlm.types.Frame` stamped with ``pts_s``, or ``server_now_s`` when it has none."""
        return Frame(self.image, server_now_s if self.pts_s is None else self.pts_s, self.source_id)


# --------------------------------------------------------------------------- validation


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_source_id(value: object, param: str = "source_id") -> str:
    """Return ``value`` if it is a valid source id (1..128 printable characters), else raise ProtocolError."""
    if not isinstance(value, str):
        raise ProtocolError("invalid_value", f"must be a string, got {type(value).__name__}", param)
    if not 1 <= len(value) <= MAX_SOURCE_ID_CHARS or not value.isprintable() or not _utf8_ok(value):
        raise ProtocolError("invalid_value", f"must be 1..{MAX_SOURCE_ID_CHARS} printable characters", param)
    return value


def _check_pts(pts_s: float | None, param: str) -> float | None:
    if pts_s is None:
        return None
    if not (isinstance(pts_s, (int, float)) and not isinstance(pts_s, bool)):
        raise ProtocolError("invalid_value", f"must be a number of seconds, got {type(pts_s).__name__}", param)
    if not (math.isfinite(pts_s) and pts_s >= 0):
        raise ProtocolError("invalid_value", f"must be a finite number of seconds >= 0, got {pts_s!r}", param)
    return float(pts_s)


# --------------------------------------------------------------------------- images


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` read from a JPEG or PNG header without decoding the pixels, or None.

    None means the bytes are neither a PNG nor a JPEG whose frame header could be found. Reading the
    size first lets a server refuse a decompression bomb before allocating it.
    """
    if data.startswith(_PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if not data.startswith(_JPEG_MAGIC):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None


def decode_image(data: bytes, limits: Limits, param: str = "image") -> np.ndarray:
    """Decode a JPEG or PNG into an HxWx3 uint8 RGB array, enforcing ``limits``.

    Raises :class:`ProtocolError`: ``frame_too_large`` for more than ``limits.max_frame_bytes`` bytes
    or a side above ``limits.max_frame_side`` (checked from the header, before decoding);
    ``invalid_frame`` for anything that is not a decodable JPEG/PNG or has a side below
    ``limits.min_frame_side``. ``param`` names the field in the error.
    """
    data = bytes(data)
    if len(data) > limits.max_frame_bytes:
        raise ProtocolError("frame_too_large", f"image is {len(data)} bytes, the limit is {limits.max_frame_bytes}", param)
    if not (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
        raise ProtocolError("invalid_frame", "not a JPEG or PNG image", param)
    size = image_size(data)
    if size is None:
        raise ProtocolError("invalid_frame", "image header is truncated or malformed", param)
    _check_sides(size[0], size[1], limits, param)
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _IMREAD_FLAGS)
    except cv2.error:
        bgr = None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ProtocolError("invalid_frame", "image could not be decoded", param)
    _check_sides(bgr.shape[1], bgr.shape[0], limits, param)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _check_sides(width: int, height: int, limits: Limits, param: str) -> None:
    if max(width, height) > limits.max_frame_side:
        raise ProtocolError("frame_too_large", f"image is {width}x{height}, the largest side allowed is "
                            f"{limits.max_frame_side} pixels", param)
    if min(width, height) < limits.min_frame_side:
        raise ProtocolError("invalid_frame", f"image is {width}x{height}, the smallest side allowed is "
                            f"{limits.min_frame_side} pixels", param)


def _encode_image(image_rgb: np.ndarray | bytes, image_format: str, quality: int) -> bytes:
    if isinstance(image_rgb, (bytes, bytearray, memoryview)):
        data = bytes(image_rgb)
        if not (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
            raise ProtocolError("invalid_frame", "encoded image bytes must be a JPEG or PNG file", "image")
        return data
    if not (isinstance(image_rgb, np.ndarray) and image_rgb.ndim == 3 and image_rgb.shape[2] == 3
            and image_rgb.dtype == np.uint8 and image_rgb.shape[0] >= 1 and image_rgb.shape[1] >= 1):
        raise ProtocolError("invalid_frame", "image must be an HxWx3 uint8 RGB array or JPEG/PNG bytes", "image")
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    if image_format == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - cv2 encodes any valid uint8 image
        raise ProtocolError("invalid_frame", "image could not be encoded", "image")
    return buf.tobytes()


# --------------------------------------------------------------------------- binary frame messages


def encode_frame(image_rgb: np.ndarray | bytes, pts_s: float | None, source_id: str = "default", quality: int = 85,
                 *, image_format: Literal["jpeg", "png"] = "jpeg") -> bytes:
    """Build a binary frame message: send the result as one binary WebSocket message.

    ``image_rgb`` is an HxWx3 uint8 RGB array (encoded as JPEG at ``quality`` 1..100, or losslessly
    as PNG with ``image_format="png"``) or the bytes of a JPEG/PNG file, sent as they are.
    ``pts_s`` is the frame's time in seconds (>= 0) on the client's clock, or None to let the server
    stamp it on arrival. Raises :class:`ProtocolError` (``invalid_value`` / ``invalid_frame``) for
    bad arguments; the server's size limits are checked only by the server.
    """
    if image_format not in ("jpeg", "png"):
        raise ProtocolError("invalid_value", f"must be 'jpeg' or 'png', got {image_format!r}", "image_format")
    if not (isinstance(quality, int) and not isinstance(quality, bool) and 1 <= quality <= 100):
        raise ProtocolError("invalid_value", f"must be an integer in 1..100, got {quality!r}", "quality")
    pts = _check_pts(pts_s, "pts_s")
    sid = check_source_id(source_id).encode("utf-8")
    image = _encode_image(image_rgb, image_format, quality)
    header = FRAME_HEADER.pack(FRAME_MAGIC, FRAME_VERSION, 0, len(sid), math.nan if pts is None else pts)
    return header + sid + image


def decode_frame(data: bytes, limits: Limits) -> DecodedFrame:
    """Read a binary frame message (see the module docstring for the layout).

    Returns a :class:`DecodedFrame` with an RGB image, ``pts_s`` (None when the sender wrote NaN)
    and the source id. Raises :class:`ProtocolError`: ``message_too_large`` beyond
    ``limits.max_message_bytes``; ``invalid_frame`` for a bad magic, version, flags, a truncated
    header or source id, or an undecodable image; ``invalid_value`` for a bad ``pts_s`` or
    ``source_id``; ``frame_too_large`` for an image over the byte or side limits.
    """
    data = bytes(data)
    if len(data) > limits.max_message_bytes:
        raise ProtocolError("message_too_large", f"message is {len(data)} bytes, the limit is {limits.max_message_bytes}")
    if len(data) < FRAME_HEADER.size:
        raise ProtocolError("invalid_frame", f"a binary frame needs a {FRAME_HEADER.size}-byte header, got {len(data)} bytes",
                            "header")
    magic, version, flags, sid_len, pts = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ProtocolError("invalid_frame", f"binary messages must start with {FRAME_MAGIC!r}", "magic")
    if version != FRAME_VERSION:
        raise ProtocolError("invalid_frame", f"unsupported frame version {version}, this server reads {FRAME_VERSION}",
                            "version")
    if flags != 0:
        raise ProtocolError("invalid_frame", f"flags are reserved and must be 0, got {flags}", "flags")
    end = FRAME_HEADER.size + sid_len
    if len(data) < end:
        raise ProtocolError("invalid_frame", "message ends inside the source id", "source_id")
    try:
        source_id = data[FRAME_HEADER.size:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid_value", "must be UTF-8", "source_id") from None
    check_source_id(source_id)
    pts_s = None if math.isnan(pts) else _check_pts(pts, "pts_s")
    image = decode_image(data[end:], limits, "image")
    return DecodedFrame(image, pts_s, source_id)
