"""The wire protocol of /v1/realtime: client events, errors, binary frames, rate limits, server events.

Everything here is Sans-I/O: no sockets, no event loop, no model; time is passed in as ``now``.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvlm.dialogue.triggers import TriggerSpec
from streamvlm.errors import ConfigError, InputError
from streamvlm.protocol import (
    APPLICATION_ERROR_CODES,
    CLIENT_EVENT_TYPES,
    ERROR_CODES,
    FRAME_HEADER,
    PROTOCOL_VERSION,
    SERVER_EVENT_TYPES,
    Connection,
    FrameAppend,
    ItemCreate,
    Limits,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
    WatchCreate,
    WatchDelete,
    WebRTCOffer,
    conversation_item_created,
    decode_frame,
    encode_frame,
    error_event,
    image_size,
    input_frame_rate,
    input_frame_stats,
    memory_update,
    parse_client_message,
    response_acknowledged,
    response_created,
    response_done,
    response_output_text_delta,
    session_created,
    session_go_away,
    session_resumption_update,
    session_updated,
    watch_created,
    watch_deleted,
    webrtc_answer,
)
from streamvlm.types import Evidence

ROOT = Path(__file__).resolve().parents[1]
EVENT_ID = re.compile(r"^evt_\d{6,}$")
CLIENT_EVENTS = (SessionUpdate, ItemCreate, ResponseCreate, ResponseCancel, FrameAppend, WatchCreate, WatchDelete, WebRTCOffer)


def _image(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth RGB test image (gradients compress well and survive JPEG closely)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1)], axis=-1)
    return np.clip(base + rng.integers(0, 3, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _errors(conn: Connection) -> list[dict]:
    return [m["error"] for m in map(json.loads, conn.data_to_send()) if m["type"] == "error"]


def _check_outgoing(texts: list[str]) -> list[dict]:
    """Every queued message is strict UTF-8 JSON with a type and a server event_id; errors use known codes."""
    messages = []
    for text in texts:
        text.encode("utf-8")
        message = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite number {c} in {text}"))
        assert isinstance(message, dict)
        assert message["type"] in SERVER_EVENT_TYPES
        assert EVENT_ID.match(message["event_id"])
        if message["type"] == "error":
            error = message["error"]
            assert error["type"] == "invalid_request_error"
            assert error["code"] in ERROR_CODES
            assert isinstance(error["message"], str) and error["message"]
            assert error["param"] is None or isinstance(error["param"], str)
            assert error["event_id"] is None or isinstance(error["event_id"], str)
        messages.append(message)
    return messages


# --------------------------------------------------------------------------- client events: round trips


ROUND_TRIP_EVENTS = [
    SessionUpdate(),
    SessionUpdate(instructions="Be brief.", event_id="c1"),
    SessionUpdate(instructions="", max_new_tokens=4096, temperature=0.7, budget_tokens=2048, policy="infinipot",
                  interrupt=False, probe_every_frames=3, event_id="c2"),
    SessionUpdate(budget_tokens=None, fields_set=frozenset({"memory.budget_tokens"})),
    SessionUpdate(temperature=0.0, max_new_tokens=1, policy="proxy-attention", interrupt=True),
    ItemCreate(("What am I holding?",), event_id="c3"),
    ItemCreate(("first part", "second part"), item_id="item_client_1"),
    ResponseCreate(),
    ResponseCreate(max_output_tokens=128, event_id="c4"),
    ResponseCancel(),
    ResponseCancel(response_id="resp_000001", event_id="c5"),
    WatchCreate("kettle.boils", "the kettle is boiling"),
    WatchCreate("fall-1", "a person falls", cooldown_s=30.0, event_id="c6"),
    WatchCreate("w_2", "the door opens", cooldown_s=2.5, trigger=TriggerSpec(kind="zscore", cooldown_s=2.5, z=3.0,
                                                                           window=10, min_history=4)),
    WatchCreate("w3", "a dog", trigger=TriggerSpec(kind="sum", threshold=2.0, baseline=0.3)),
    WatchDelete("fall-1", event_id="c7"),
    WebRTCOffer("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n", event_id="c8"),
]


@pytest.mark.parametrize("event", ROUND_TRIP_EVENTS, ids=lambda e: e.type)
def test_client_event_round_trip(event) -> None:
    text = json.dumps(event.to_dict())
    assert parse_client_message(text, Limits()) == event
    conn = Connection()
    assert conn.receive_text(text) == [event]
    assert conn.data_to_send() == []
    assert json.loads(text)["type"] == event.type


@pytest.mark.parametrize("pts_s", [None, 0.0, 12.25])
def test_frame_append_round_trip(pts_s: float | None) -> None:
    event = FrameAppend(_image(), pts_s, "front door", event_id="f1")
    conn = Connection()
    [parsed] = conn.receive_text(json.dumps(event.to_dict()), now=0.0)
    assert isinstance(parsed, FrameAppend) and not parsed.binary
    assert (parsed.event_id, parsed.pts_s, parsed.source_id) == ("f1", pts_s, "front door")
    np.testing.assert_array_equal(parsed.image, event.image)


def test_every_client_event_type_has_a_class() -> None:
    assert {cls.type for cls in CLIENT_EVENTS} == set(CLIENT_EVENT_TYPES)


def test_realtime_style_messages_parse() -> None:
    limits = Limits()
    update = parse_client_message(json.dumps({
        "type": "session.update", "event_id": "e1",
        "session": {"instructions": "Watch the kitchen.", "sampling": {"max_new_tokens": 64, "temperature": 0},
                    "memory": {"budget_tokens": None, "policy": "window"}, "interrupt": True, "probe_every_frames": 2,
                    "modalities": ["text"], "voice": "alloy"}}), limits)  # unknown fields are ignored
    assert isinstance(update, SessionUpdate)
    assert update.budget_tokens is None and "memory.budget_tokens" in update.fields_set
    assert update.fields_set == {"instructions", "sampling.max_new_tokens", "sampling.temperature",
                                 "memory.budget_tokens", "memory.policy", "interrupt", "probe_every_frames"}
    assert update.temperature == 0.0 and isinstance(update.temperature, float)

    item = parse_client_message(json.dumps({
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Tell me when"}, {"type": "input_text", "text": "the kettle boils"}]}}))
    assert isinstance(item, ItemCreate) and item.event_id is None
    assert item.text == "Tell me when\nthe kettle boils"

    assert parse_client_message('{"type": "response.create"}') == ResponseCreate()
    assert parse_client_message('{"type": "response.create", "response": {"modalities": ["text"]}}') == ResponseCreate()
    assert parse_client_message('{"type": "response.cancel"}') == ResponseCancel()


def test_watch_spec_uses_defaults_and_cooldown() -> None:
    default = TriggerSpec(kind="threshold", on=0.7, off=0.3)
    assert WatchCreate("a", "x").spec(default) is default
    assert WatchCreate("a", "x").spec() is None
    assert WatchCreate("a", "x", cooldown_s=5.0).spec(default) == TriggerSpec(kind="threshold", on=0.7, off=0.3, cooldown_s=5.0)
    event = parse_client_message(json.dumps({"type": "watch.create", "watch": {
        "id": "w", "condition": "c", "cooldown_s": 4, "trigger": {"kind": "threshold", "on": 0.8, "m": 1, "n": 1}}}))
    assert event.spec(default) == TriggerSpec(kind="threshold", cooldown_s=4.0, on=0.8, m=1, n=1)


def test_binary_frame_becomes_frame_append() -> None:
    conn = Connection()
    image = _image(16, 20)
    [event] = conn.receive_bytes(encode_frame(image, 3.5, "cam-2", image_format="png"), now=1.0)
    assert isinstance(event, FrameAppend) and event.binary and event.event_id is None
    assert (event.pts_s, event.source_id) == (3.5, "cam-2")
    np.testing.assert_array_equal(event.image, image)
    assert conn.frames_accepted == 1 and conn.data_to_send() == []


# --------------------------------------------------------------------------- client errors


def _msg(kind: str, **body) -> str:
    return json.dumps({"type": kind, "event_id": "c1", **body}, ensure_ascii=False)


def _item(*parts) -> dict:
    return {"type": "message", "role": "user", "content": list(parts)}


TEXT = {"type": "input_text", "text": "hello"}
BAD_VALUES = [
    # (message, param)
    (_msg("session.update"), "session"),
    (_msg("session.update", session=[]), "session"),
    (_msg("session.update", session={"instructions": 3}), "session.instructions"),
    (_msg("session.update", session={"instructions": "x" * 4001}), "session.instructions"),
    (_msg("session.update", session={"sampling": 1}), "session.sampling"),
    (_msg("session.update", session={"sampling": {"max_new_tokens": 0}}), "session.sampling.max_new_tokens"),
    (_msg("session.update", session={"sampling": {"max_new_tokens": 4097}}), "session.sampling.max_new_tokens"),
    (_msg("session.update", session={"sampling": {"max_new_tokens": 5.0}}), "session.sampling.max_new_tokens"),
    (_msg("session.update", session={"sampling": {"max_new_tokens": True}}), "session.sampling.max_new_tokens"),
    (_msg("session.update", session={"sampling": {"temperature": 2.5}}), "session.sampling.temperature"),
    (_msg("session.update", session={"sampling": {"temperature": -0.1}}), "session.sampling.temperature"),
    (_msg("session.update", session={"sampling": {"temperature": "hot"}}), "session.sampling.temperature"),
    ('{"type": "session.update", "event_id": "c1", "session": {"sampling": {"temperature": 1e400}}}',
     "session.sampling.temperature"),  # parses as infinity
    (_msg("session.update", session={"memory": {"budget_tokens": 15}}), "session.memory.budget_tokens"),
    (_msg("session.update", session={"memory": {"budget_tokens": "big"}}), "session.memory.budget_tokens"),
    (_msg("session.update", session={"memory": {"policy": "lru"}}), "session.memory.policy"),
    (_msg("session.update", session={"memory": {"policy": ["window"]}}), "session.memory.policy"),
    (_msg("session.update", session={"memory": None}), "session.memory"),
    (_msg("session.update", session={"interrupt": "yes"}), "session.interrupt"),
    (_msg("session.update", session={"probe_every_frames": 0}), "session.probe_every_frames"),
    (_msg("conversation.item.create"), "item"),
    (_msg("conversation.item.create", item="hi"), "item"),
    (_msg("conversation.item.create", item={"type": "function_call", "content": [TEXT]}), "item.type"),
    (_msg("conversation.item.create", item={"role": "assistant", "content": [TEXT]}), "item.role"),
    (_msg("conversation.item.create", item={"type": "message", "role": "user"}), "item.content"),
    (_msg("conversation.item.create", item=_item()), "item.content"),
    (_msg("conversation.item.create", item={"content": "hello"}), "item.content"),
    (_msg("conversation.item.create", item=_item("hello")), "item.content[0]"),
    (_msg("conversation.item.create", item=_item({"type": "input_audio", "audio": ""})), "item.content[0].type"),
    (_msg("conversation.item.create", item=_item({"type": "input_text"})), "item.content[0].text"),
    (_msg("conversation.item.create", item=_item({"type": "input_text", "text": ""})), "item.content[0].text"),
    (_msg("conversation.item.create", item=_item({"type": "input_text", "text": "   "})), "item.content[0].text"),
    (_msg("conversation.item.create", item=_item(TEXT, {"type": "input_text", "text": 7})), "item.content[1].text"),
    (_msg("conversation.item.create", item=_item({"type": "input_text", "text": "x" * 3000},
                                                 {"type": "input_text", "text": "y" * 1500})), "item.content[1].text"),
    (_msg("conversation.item.create", item={**_item(TEXT), "id": ""}), "item.id"),
    (_msg("response.create", response="now"), "response"),
    (_msg("response.create", response={"max_output_tokens": 0}), "response.max_output_tokens"),
    (_msg("response.create", response={"max_output_tokens": "inf"}), "response.max_output_tokens"),
    (_msg("response.cancel", response_id=5), "response_id"),
    (_msg("response.cancel", response_id=""), "response_id"),
    (_msg("input_frame.append"), "frame"),
    (_msg("input_frame.append", frame=123), "frame"),
    (_msg("input_frame.append", frame="AAAA", pts_s=-1), "pts_s"),
    (_msg("input_frame.append", frame="AAAA", pts_s="now"), "pts_s"),
    (_msg("input_frame.append", frame="AAAA", source_id=""), "source_id"),
    (_msg("input_frame.append", frame="AAAA", source_id="a\nb"), "source_id"),
    (_msg("input_frame.append", frame="AAAA", source_id=["cam"]), "source_id"),
    (_msg("watch.create"), "watch"),
    (_msg("watch.create", watch={"condition": "x"}), "watch.id"),
    (_msg("watch.create", watch={"id": "", "condition": "x"}), "watch.id"),
    (_msg("watch.create", watch={"id": "has space", "condition": "x"}), "watch.id"),
    (_msg("watch.create", watch={"id": "x" * 65, "condition": "x"}), "watch.id"),
    (_msg("watch.create", watch={"id": "ok\n", "condition": "x"}), "watch.id"),
    (_msg("watch.create", watch={"id": "w"}), "watch.condition"),
    (_msg("watch.create", watch={"id": "w", "condition": ""}), "watch.condition"),
    (_msg("watch.create", watch={"id": "w", "condition": "x", "cooldown_s": -1}), "watch.cooldown_s"),
    (_msg("watch.create", watch={"id": "w", "condition": "x", "trigger": "fast"}), "watch.trigger"),
    (_msg("watch.create", watch={"id": "w", "condition": "x", "trigger": {}}), "watch.trigger.kind"),
    (_msg("watch.create", watch={"id": "w", "condition": "x", "trigger": {"kind": "ewma"}}), "watch.trigger.kind"),
    (_msg("watch.create", watch={"id": "w", "condition": "x", "trigger": {"kind": "threshold", "on": 1.5}}),
     "watch.trigger.on"),
    (_msg("watch.create", watch={"id": "w", "condition": "x", "trigger": {"kind": "threshold", "m": 4, "n": 3}}),
     "watch.trigger.m"),
    (_msg("watch.create", watch={"id": "w", "condition": "x", "trigger": {"kind": "zscore", "window": 2.5}}),
     "watch.trigger.window"),
    (_msg("watch.create", watch={"id": "w", "condition": "x", "trigger": {"kind": "sum", "threshold": 0}}),
     "watch.trigger.threshold"),
    (_msg("watch.delete"), "watch_id"),
    (_msg("watch.delete", watch_id="a/b"), "watch_id"),
]


@pytest.mark.parametrize(("message", "param"), BAD_VALUES)
def test_invalid_value_names_the_field_and_echoes_event_id(message: str, param: str) -> None:
    conn = Connection()
    assert conn.receive_text(message, now=0.0) == []
    [error] = _errors(conn)
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", param, "c1")
    assert error["type"] == "invalid_request_error"
    assert conn.error_counts == {"invalid_value": 1}
    with pytest.raises(ProtocolError) as info:
        parse_client_message(message)
    assert isinstance(info.value, InputError)
    assert (info.value.code, info.value.param, info.value.client_event_id) == ("invalid_value", param, "c1")


MESSAGE_ERRORS = [
    # (message, code, param, echoed event_id)
    ("{", "invalid_json", None, None),
    ("", "invalid_json", None, None),
    ('{"type": "response.create", "x": NaN}', "invalid_json", None, None),
    ("[" * 100_000, "invalid_json", None, None),
    ("[1, 2]", "invalid_event", None, None),
    ('"session.update"', "invalid_event", None, None),
    ("null", "invalid_event", None, None),
    ('{"event_id": "c1"}', "invalid_event", "type", "c1"),
    ('{"type": 7, "event_id": "c1"}', "invalid_event", "type", "c1"),
    ('{"type": "input_audio_buffer.append", "event_id": "c1"}', "unknown_event", "type", "c1"),
    ('{"type": "Session.Update", "event_id": "c1"}', "unknown_event", "type", "c1"),
    ('{"type": "response.create", "event_id": 42}', "invalid_value", "event_id", None),
    ('{"type": "response.create", "event_id": ""}', "invalid_value", "event_id", None),
    ('{"type": "response.create", "event_id": "\\ud800"}', "invalid_value", "event_id", None),
    (json.dumps({"type": "conversation.item.create", "event_id": "c1",
                 "item": _item({"type": "input_text", "text": "\ud800"})}), "invalid_value", "item.content[0].text", "c1"),
]


@pytest.mark.parametrize(("message", "code", "param", "event_id"), MESSAGE_ERRORS)
def test_malformed_messages(message: str, code: str, param: str | None, event_id: str | None) -> None:
    conn = Connection()
    assert conn.receive_text(message) == []
    _check_outgoing(texts := conn.data_to_send())
    [error] = [json.loads(t)["error"] for t in texts]
    assert (error["code"], error["param"], error["event_id"]) == (code, param, event_id)


def test_message_too_large() -> None:
    limits = Limits(max_message_bytes=1000, max_frame_bytes=500)
    conn = Connection(limits)
    assert conn.receive_text(_msg("session.update", session={"instructions": "x" * 2000})) == []
    assert conn.receive_text(_msg("session.update", session={"instructions": "é" * 600})) == []  # 1200 UTF-8 bytes
    assert conn.receive_bytes(b"\0" * 1001, now=0.0) == []
    errors = _errors(conn)
    assert [e["code"] for e in errors] == ["message_too_large"] * 3
    assert all(e["param"] is None for e in errors)
    assert conn.receive_text(_msg("session.update", session={"instructions": "é" * 400})) != []


def test_frame_errors_in_json_form() -> None:
    limits = Limits(max_frame_bytes=4000, max_frame_side=64, min_frame_side=8)
    conn = Connection(limits)
    big_png = _png(np.random.default_rng(1).integers(0, 255, (60, 60, 3), dtype=np.uint8))  # ~10 kB of noise
    assert len(big_png) > 4000
    cases = [
        (_b64(big_png), "frame_too_large"),
        (_b64(_png(_image(8, 80))), "frame_too_large"),       # 80 px wide > 64
        (_b64(_png(_image(4, 16))), "invalid_frame"),         # 4 px high < 8
        (_b64(b"GIF89a" + b"\0" * 20), "invalid_frame"),      # not JPEG/PNG
        ("not base64!", "invalid_frame"),
        (_b64(_png(_image())[:40]), "invalid_frame"),         # truncated PNG
        (_b64(_jpeg(_image())[:30]), "invalid_frame"),        # JPEG cut before its frame header
    ]
    for frame, code in cases:
        assert conn.receive_text(_msg("input_frame.append", frame=frame), now=0.0) == []
        [error] = _errors(conn)
        assert (error["code"], error["param"], error["event_id"]) == (code, "frame", "c1"), frame[:20]
    assert conn.error_counts == {"frame_too_large": 2, "invalid_frame": 5}
    # A data URL is accepted too.
    [event] = conn.receive_text(_msg("input_frame.append", frame="data:image/png;base64," + _b64(_png(_image()))), now=9.0)
    assert event.image.shape == (24, 32, 3)


def _header(version: int = 1, flags: int = 0, sid: bytes = b"cam", pts: float = 1.0, magic: bytes = b"SVF1") -> bytes:
    return FRAME_HEADER.pack(magic, version, flags, len(sid), pts) + sid


def test_frame_errors_in_binary_form() -> None:
    limits = Limits(max_frame_bytes=4000, max_frame_side=64, min_frame_side=8)
    png = _png(_image())
    bomb = bytearray(png)
    bomb[16:24] = struct.pack(">II", 100_000, 100_000)  # claims 100000x100000: refused before decoding
    cases = [
        (b"SVF1", "invalid_frame", "header"),
        (_header(magic=b"SVF2") + png, "invalid_frame", "magic"),
        (_header(version=2) + png, "invalid_frame", "version"),
        (_header(flags=1) + png, "invalid_frame", "flags"),
        (FRAME_HEADER.pack(b"SVF1", 1, 0, 10, 0.0) + b"cam", "invalid_frame", "source_id"),
        (_header(sid=b"\xff\xfe") + png, "invalid_value", "source_id"),
        (_header(sid=b"") + png, "invalid_value", "source_id"),
        (_header(pts=-1.0) + png, "invalid_value", "pts_s"),
        (_header(pts=math.inf) + png, "invalid_value", "pts_s"),
        (_header(), "invalid_frame", "image"),
        (_header() + b"hello", "invalid_frame", "image"),
        (_header() + bytes(bomb), "frame_too_large", "image"),
        (_header() + _png(_image(8, 65)), "frame_too_large", "image"),
        (_header() + _png(_image(7, 16)), "invalid_frame", "image"),
        (_header() + b"\x89PNG\r\n\x1a\n" + b"\0" * 5000, "frame_too_large", "image"),
    ]
    for now, (data, code, param) in enumerate(cases):
        conn = Connection(limits)
        assert conn.receive_bytes(data, now=float(now)) == []
        [error] = _errors(conn)
        assert (error["code"], error["param"], error["event_id"]) == (code, param, None), data[:24]
        with pytest.raises(ProtocolError) as info:
            decode_frame(data, limits)
        assert (info.value.code, info.value.param) == (code, param)


def test_every_documented_protocol_code_is_produced() -> None:
    """One connection, one message per code: the error table is complete and reachable."""
    conn = Connection(Limits(max_message_bytes=20_000, max_frame_bytes=10_000, max_frames_per_s=1.0))
    conn.receive_text("{oops")
    conn.receive_text("[]")
    conn.receive_text(_msg("response.dance"))
    conn.receive_text(_msg("response.create", response={"max_output_tokens": -1}))
    conn.receive_text("x" * 20_001)
    conn.receive_bytes(_header() + b"\x89PNG\r\n\x1a\n" + b"\0" * 10_001, now=0.0)
    conn.receive_bytes(_header() + b"junk", now=1.0)
    conn.receive_bytes(_header() + _png(_image()), now=1.0)
    assert conn.error_counts == {code: 1 for code in ERROR_CODES}
    assert [m["error"]["code"] for m in _check_outgoing(conn.data_to_send())] == [
        "invalid_json", "invalid_event", "unknown_event", "invalid_value", "message_too_large",
        "frame_too_large", "invalid_frame", "rate_limited"]


# --------------------------------------------------------------------------- binary frames


def test_binary_frame_layout() -> None:
    data = encode_frame(_png(_image()), 2.0, "cam-é")
    assert data[:4] == b"SVF1" and data[4] == 1 and data[5] == 0
    (sid_len,) = struct.unpack_from("<H", data, 6)
    (pts,) = struct.unpack_from("<d", data, 8)
    assert sid_len == len("cam-é".encode()) == 6 and pts == 2.0
    assert data[16:22].decode() == "cam-é" and data[22:] == _png(_image())


def test_binary_frame_round_trip_png_exact_jpeg_close() -> None:
    limits = Limits()
    image = _image(48, 64, seed=3)
    png = decode_frame(encode_frame(image, 1.25, "cam", image_format="png"), limits)
    np.testing.assert_array_equal(png.image, image)
    assert (png.pts_s, png.source_id) == (1.25, "cam")
    jpeg = decode_frame(encode_frame(image, 0.0, quality=95), limits)
    assert jpeg.image.shape == image.shape and jpeg.image.dtype == np.uint8
    assert np.abs(jpeg.image.astype(int) - image.astype(int)).mean() < 4.0
    assert (jpeg.pts_s, jpeg.source_id) == (0.0, "default")
    # Colour order survives: a pure red image stays red.
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    assert decode_frame(encode_frame(red, None), limits).image[..., 0].min() > 240
    # Pre-encoded bytes pass through untouched.
    assert decode_frame(encode_frame(_png(image), None), limits).image.tolist() == image.tolist()


def test_nan_pts_means_server_clock() -> None:
    data = encode_frame(_image(), None)
    assert math.isnan(struct.unpack_from("<d", data, 8)[0])
    frame = decode_frame(data, Limits())
    assert frame.pts_s is None
    assert frame.to_frame(server_now_s=7.5).pts_s == 7.5
    assert decode_frame(encode_frame(_image(), 3.0), Limits()).to_frame(7.5).pts_s == 3.0


def test_encode_frame_rejects_bad_arguments() -> None:
    for kwargs, param in [
        ({"image_rgb": np.zeros((8, 8), np.uint8)}, "image"),
        ({"image_rgb": np.zeros((8, 8, 3), np.float32)}, "image"),
        ({"image_rgb": b"GIF89a"}, "image"),
        ({"pts_s": -1.0}, "pts_s"),
        ({"pts_s": math.nan}, "pts_s"),
        ({"source_id": ""}, "source_id"),
        ({"quality": 0}, "quality"),
        ({"image_format": "gif"}, "image_format"),
    ]:
        args = {"image_rgb": _image(), "pts_s": 0.0, **kwargs}
        with pytest.raises(ProtocolError) as info:
            encode_frame(**args)
        assert info.value.param == param


def test_image_size_reads_headers() -> None:
    assert image_size(_png(_image(20, 30))) == (30, 20)
    assert image_size(_jpeg(_image(20, 30))) == (30, 20)
    assert image_size(b"\xff\xd8\xff\xd9") is None
    assert image_size(b"GIF89a") is None


# --------------------------------------------------------------------------- rate limiting


def test_rate_limit_token_bucket_with_explicit_now() -> None:
    conn = Connection(Limits(max_frames_per_s=10.0))
    frame = encode_frame(_image(), 0.0, image_format="png")
    accepted = sum(len(conn.receive_bytes(frame, now=100.0)) for _ in range(15))
    assert accepted == 10  # a burst of one second's worth
    assert conn.error_counts == {"rate_limited": 5}
    errors = _errors(conn)
    assert {(e["code"], e["param"], e["event_id"]) for e in errors} == {("rate_limited", None, None)}
    assert len(conn.receive_bytes(frame, now=100.05)) == 0  # half a token refilled
    assert [e["code"] for e in _errors(conn)] == ["rate_limited"]
    assert len(conn.receive_bytes(frame, now=100.1)) == 1
    # Steady 10 fps passes; the JSON form shares the bucket and echoes its event_id when refused.
    for i in range(1, 21):
        assert len(conn.receive_bytes(frame, now=100.1 + i * 0.1)) == 1
    json_frame = _msg("input_frame.append", frame=_b64(_png(_image())))
    assert conn.receive_text(json_frame, now=102.1) == []
    [error] = _errors(conn)
    assert (error["code"], error["event_id"]) == ("rate_limited", "c1")
    # After a pause the bucket is full again, but never above one second's worth.
    assert sum(len(conn.receive_bytes(frame, now=200.0)) for _ in range(12)) == 10
    assert conn.frames_accepted == 10 + 1 + 20 + 10


def test_rate_limit_time_only_moves_when_told() -> None:
    conn = Connection(Limits(max_frames_per_s=2.0))
    frame = encode_frame(_image(), None, image_format="png")
    assert [len(conn.receive_bytes(frame)) for _ in range(3)] == [1, 1, 0]  # now=None: no time passes
    assert len(conn.receive_bytes(frame, now=5.0)) == 0                      # first explicit time: nothing to refill yet
    assert len(conn.receive_bytes(frame, now=4.0)) == 0                      # going back counts as no time passing
    assert len(conn.receive_bytes(frame, now=5.5)) == 1
    with pytest.raises(InputError):
        conn.receive_bytes(frame, now=math.nan)
    with pytest.raises(InputError):
        conn.receive_text("{}", now=math.inf)
    # Non-frame events are never rate-limited.
    assert all(conn.receive_text(_msg("response.create"), now=5.5) for _ in range(50))


# --------------------------------------------------------------------------- robustness (property-based)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_message_bytes=64 * 1024, max_frame_bytes=32 * 1024, max_frame_side=256, max_frames_per_s=1000.0)

_json_leaf = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                     max_leaves=20)
_field_names = st.sampled_from(["session", "item", "response", "response_id", "frame", "pts_s", "source_id", "watch",
                                "watch_id", "instructions", "sampling", "memory", "content", "text", "id", "condition",
                                "trigger", "kind", "type", "role", "max_output_tokens", "cooldown_s", "event_id"])
_structured = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_field_names, inner, max_size=5),
                           max_leaves=25)
_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(CLIENT_EVENT_TYPES) | st.text(max_size=10)},
    optional={"event_id": st.text(max_size=10) | st.integers(), "session": _structured, "item": _structured,
              "response": _structured, "response_id": _json_leaf, "frame": _json_leaf, "pts_s": _json_leaf,
              "source_id": _json_leaf, "watch": _structured, "watch_id": _json_leaf})


def _fuzz_text(conn: Connection, text: str) -> None:
    events = conn.receive_text(text, now=0.0)
    assert len(events) <= 1 and all(isinstance(e, CLIENT_EVENTS) for e in events)
    out = _check_outgoing(conn.data_to_send())
    assert len(out) == 1 - len(events)


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_never_raise(text: str) -> None:
    _fuzz_text(Connection(SMALL), text)


@FUZZ
@given(_messages)
def test_arbitrary_json_events_never_raise(message: dict) -> None:
    _fuzz_text(Connection(SMALL), json.dumps(message))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    conn = Connection(SMALL)
    events = conn.receive_bytes(data, now=0.0)
    assert all(isinstance(e, FrameAppend) for e in events)
    errors = _check_outgoing(conn.data_to_send())
    assert len(errors) == 1 - len(events) and all(e["error"]["event_id"] is None for e in errors)


_SAMPLE_IMAGES = [_png(_image(16, 16, seed=1)), _jpeg(_image(16, 24, seed=2))]


@FUZZ
@given(header=st.builds(lambda v, f, n, pts, sid: FRAME_HEADER.pack(b"SVF1", v, f, n, pts) + sid,
                        st.sampled_from([1, 1, 1, 0, 2]), st.sampled_from([0, 0, 0, 1]), st.integers(0, 12),
                        st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=12)),
       image=st.sampled_from(_SAMPLE_IMAGES), cuts=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
       truncate=st.none() | st.integers(0, 2000))
def test_mutated_frames_never_raise(header: bytes, image: bytes, cuts: list, truncate: int | None) -> None:
    data = bytearray(image)
    for pos, value in cuts:
        data[pos % len(data)] = value
    if truncate is not None:
        data = data[:truncate]
    conn = Connection(SMALL)
    events = conn.receive_bytes(bytes(header) + bytes(data), now=0.0)
    for event in events:
        assert isinstance(event, FrameAppend) and event.binary
        assert event.image.dtype == np.uint8 and event.image.ndim == 3 and event.image.shape[2] == 3
        assert event.pts_s is None or (math.isfinite(event.pts_s) and event.pts_s >= 0)
    assert len(_check_outgoing(conn.data_to_send())) == 1 - len(events)


# --------------------------------------------------------------------------- server events


def test_server_builders_produce_valid_events() -> None:
    limits = Limits()
    events = [
        session_created("sess_1", "tiny-smolvlm", limits, {"instructions": "hi", "id": "ignored"}),
        session_updated("sess_1", {"instructions": "Be brief.", "sampling": {"temperature": 0.0}}),
        conversation_item_created("item_1", "What am I holding?"),
        conversation_item_created("item_2", "A mug.", role="assistant"),
        response_created("resp_1"),
        response_output_text_delta("resp_1", "A "),
        response_done("resp_1", "completed", "user", "A mug.", [Evidence(11.0, "cam"), {"pts_s": 12, "source_id": "cam"}],
                      input_tokens=812, output_tokens=4),
        response_acknowledged("resp_2", "the kettle boils"),
        watch_created("fall", "a person falls", TriggerSpec(cooldown_s=30.0)),
        watch_created("door", "the door opens"),
        watch_deleted("fall"),
        response_created("resp_3", "watch", alert={"watch_id": "fall", "condition": "a person falls", "t": 42.0}),
        response_done("resp_3", "completed", "watch", "Someone fell.", [Evidence(42.0)], 900, 5,
                      alert={"watch_id": "fall", "condition": "a person falls", "t": 42.0}),
        response_done("resp_4", "cancelled", "commentary", ""),
        memory_update("evicted", 3, 2048, 1536, 61.5, 1_000_000, 0),
        memory_update("spilled", 1, 0, 0, None),
        input_frame_stats(120, 80, 10, 30),
        input_frame_rate(0.5, "compute", "capped"),
        session_resumption_update("rh_abc", True),
        session_resumption_update(None, False),
        session_go_away(10_000),
        webrtc_answer("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"),
        error_event("watch_not_found", "no watch 'x'", "watch_id", "c9"),
        error_event("server_error", "model failed"),
    ]
    conn = Connection()
    for event in events:
        conn.send(event)
    texts = conn.data_to_send()
    assert conn.data_to_send() == []
    parsed = [json.loads(t) for t in texts]
    assert [p["type"] for p in parsed[:-2]] == [e["type"] for e in events[:-2]]
    assert {p["type"] for p in parsed} == set(SERVER_EVENT_TYPES)
    ids = [p["event_id"] for p in parsed]
    assert len(set(ids)) == len(ids) and all(EVENT_ID.match(i) for i in ids)
    created = parsed[0]["session"]
    assert (created["id"], created["protocol"], created["limits"]) == ("sess_1", PROTOCOL_VERSION, limits.to_dict())
    done = parsed[6]["response"]
    assert done["evidence"] == [{"pts_s": 11.0, "source_id": "cam"}, {"pts_s": 12.0, "source_id": "cam"}]
    assert done["usage"] == {"input_tokens": 812, "output_tokens": 4, "total_tokens": 816}
    assert "alert" not in done and parsed[12]["response"]["alert"]["watch_id"] == "fall"
    assert parsed[8]["watch"]["cooldown_s"] == 30.0 and parsed[8]["watch"]["trigger"]["kind"] == "threshold"
    assert parsed[-2]["error"] == {"type": "invalid_request_error", "code": "watch_not_found", "message": "no watch 'x'",
                                   "param": "watch_id", "event_id": "c9"}
    assert parsed[-1]["error"]["type"] == "server_error"
    assert set(APPLICATION_ERROR_CODES).isdisjoint(ERROR_CODES)


def test_builders_and_send_refuse_bad_values() -> None:
    with pytest.raises(InputError):
        response_done("r", "finished", "user", "")
    with pytest.raises(InputError):
        response_created("r", "proactive")
    with pytest.raises(InputError):
        response_done("r", "completed", "user", "", [Evidence(math.nan)])
    with pytest.raises(InputError):
        input_frame_stats(-1, 0, 0, 0)
    conn = Connection()
    with pytest.raises(InputError):
        conn.send({"type": "x"})
    with pytest.raises(InputError):
        conn.send({"type": "x", "event_id": "evt_1", "value": math.inf})
    assert conn.data_to_send() == []


def test_protocol_error_event_from_exception() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(_msg("watch.delete", watch_id=""))
    exc = info.value
    event = error_event(exc.code, exc.detail, exc.param, exc.client_event_id)
    assert event["error"] == {"type": "invalid_request_error", "code": "invalid_value", "message": exc.detail,
                              "param": "watch_id", "event_id": "c1"}


# --------------------------------------------------------------------------- limits, imports, docs


@pytest.mark.parametrize("kwargs", [
    {"max_message_bytes": 0}, {"max_frame_bytes": 5 * 2**20}, {"max_frame_side": 4, "min_frame_side": 8},
    {"min_frame_side": 0}, {"max_text_chars": 0}, {"max_frames_per_s": 0}, {"max_frames_per_s": math.inf},
    {"max_text_chars": True}, {"max_frame_side": 10.0},
])
def test_limits_are_validated(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        Limits(**kwargs)


def test_protocol_imports_no_torch_asyncio_or_websockets() -> None:
    code = ("import sys, streamvlm.protocol; "
            "print(sorted(m for m in ('torch', 'asyncio', 'websockets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    for path in (ROOT / "streamvlm" / "protocol").glob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(torch|asyncio|websockets)\b", source, re.M), path.name


def test_docs_cover_every_event_and_error() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for name in (*CLIENT_EVENT_TYPES, *SERVER_EVENT_TYPES, *ERROR_CODES, *APPLICATION_ERROR_CODES, PROTOCOL_VERSION):
        assert f"`{name}`" in doc, name
    for phrase in ("OpenAI Realtime", "Gemini Live", "?resume=", "SVF1"):
        assert phrase in doc
