"""Two real aiortc peers on 127.0.0.1: a client's video track reaches the model through the server, and
its frames land on the session's stream clock (docs/clocks.md) instead of the track's own origin."""

from __future__ import annotations

import asyncio
import fractions
import json

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from av import VideoFrame
from websockets.asyncio.client import connect

from streamvlm.engine.check import synthetic_frames
from streamvlm.ingest.clock import RTP_TIME, SessionClock
from streamvlm.protocol import encode_frame
from streamvlm.server.webrtc import accept_offer, loopback_ice_only, rtp_time

from test_server import ask, next_of, run, started


class MovingSquare(VideoStreamTrack):
    """A synthetic camera: a square moving over a dark background, 10 frames per second."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    async def recv(self) -> VideoFrame:
        await asyncio.sleep(0.1)
        img = np.full((120, 160, 3), 30, np.uint8)
        x = (self.n * 7) % 120
        img[40:80, x : x + 40] = (220, 40, 40)
        frame = VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = self.n, fractions.Fraction(1, 10)
        self.n += 1
        return frame


def test_video_over_webrtc_reaches_the_model(smol):
    async def main():
        loopback_ice_only()
        server, url, _ = await started(smol)
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            client.addTrack(MovingSquare())
            await client.setLocalDescription(await client.createOffer())
            sdp = client.localDescription.sdp
            assert "127.0.0.1" in sdp
            async with connect(url) as ws:
                await next_of(ws, "session.created")
                await ws.send(json.dumps({"type": "webrtc.offer", "event_id": "o1", "sdp": sdp}))
                answer = await next_of(ws, "webrtc.answer")
                for line in answer["sdp"].splitlines():
                    if line.startswith("a=candidate"):
                        assert " 127.0.0.1 " in line, line  # loopback candidates only
                await client.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
                stats = await next_of(ws, "input_frame.stats", timeout=30)
                while stats["ingested"] < 2:
                    stats = await next_of(ws, "input_frame.stats", timeout=30)
                await ask(ws, "Where is the red square?")
                done = await next_of(ws, "response.done")
                evidence = done["response"]["evidence"]
                assert evidence and all(e["source_id"] == "webrtc" for e in evidence)
        finally:
            await client.close()
            await server.stop()

    run(main())


async def _connect(client: RTCPeerConnection, on_frame, clock) -> RTCPeerConnection:
    """Offer ``client``'s track to :func:`accept_offer` (no server): returns the receiving peer."""
    await client.setLocalDescription(await client.createOffer())
    answer, server_peer = await accept_offer(client.localDescription.sdp, on_frame, clock=clock)
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return server_peer


def test_track_frames_come_with_rtp_time_and_land_on_the_sessions_clock():
    """After 100 s of socket frames a WebRTC track starts at 100 s and runs on (it used to freeze there)."""
    async def main():
        loopback_ice_only()
        session = SessionClock()
        for i in range(11):
            session.stamp("browser", 10.0 * i, 900.0 + 10.0 * i)  # socket frames: 0 .. 100 s, received 900 .. 1000
        seen: list[tuple[int | None, int | None, float, float]] = []
        got = asyncio.Event()

        def on_frame(image, timestamp, clock_rate, received_s):
            assert image.shape == (120, 160, 3)
            t = session.stamp_rtp("webrtc", timestamp, clock_rate, received_s, policy=RTP_TIME)
            seen.append((timestamp, clock_rate, received_s, t))
            if len(seen) >= 8:
                got.set()

        calls = iter(range(1, 10_000))
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        client.addTrack(MovingSquare())
        # a fake receive clock: 1000.1, 1000.2, ...
        server_peer = await _connect(client, on_frame, lambda: 1000.0 + 0.1 * next(calls))
        try:
            await asyncio.wait_for(got.wait(), 60)
        finally:
            await client.close()
            await server_peer.close()
        timestamps = [s[0] for s in seen]
        assert all(isinstance(ts, int) for ts in timestamps) and {s[1] for s in seen} == {90_000}
        first_ts, _, first_received, first_t = seen[0]
        assert first_t == 100.0 + (first_received - 1000.0)  # the session's current time, not the track's origin
        for ts, _, _, t in seen[1:]:
            assert t == first_t + (ts - first_ts) / 90_000  # then the track's own deltas
        assert [s[3] for s in seen] == sorted(s[3] for s in seen) and seen[-1][3] > first_t

    run(main())


def test_rtp_time_of_a_decoded_frame():
    assert rtp_time(123, fractions.Fraction(1, 90_000)) == (123, 90_000)
    assert rtp_time(7, fractions.Fraction(1001, 30_000)) == (7007, 30_000)
    assert rtp_time(None, fractions.Fraction(1, 90_000)) == (None, None)
    assert rtp_time(5, None) == (None, None)


def test_webrtc_after_socket_frames_continues_the_session_clock(smol):
    """Through the server: socket frames up to 100 s, then a WebRTC track; the track's frames are
    stamped after 100 s and apart from each other, not all frozen at 100 s."""
    async def main():
        loopback_ice_only()
        server, url, _ = await started(smol)
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            client.addTrack(MovingSquare())
            await client.setLocalDescription(await client.createOffer())
            async with connect(url) as ws:
                await next_of(ws, "session.created")
                for pts, img in zip((0.0, 50.0, 100.0), synthetic_frames(3)):
                    await ws.send(encode_frame(img, pts, "cam"))
                stats = await next_of(ws, "input_frame.stats", timeout=30)
                while stats["skipped"] + stats["dropped"] + stats["ingested"] < 3:
                    stats = await next_of(ws, "input_frame.stats", timeout=30)
                before = stats["ingested"]
                await ws.send(json.dumps({"type": "webrtc.offer", "event_id": "o1", "sdp": client.localDescription.sdp}))
                answer = await next_of(ws, "webrtc.answer")
                await client.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
                while stats["ingested"] < before + 3:
                    stats = await next_of(ws, "input_frame.stats", timeout=30)
                await ask(ws, "Where is the red square?")
                done = await next_of(ws, "response.done")
                times = [e["pts_s"] for e in done["response"]["evidence"] if e["source_id"] == "webrtc"]
                assert len(times) >= 2, done["response"]["evidence"]
                assert all(t >= 100.0 for t in times) and times == sorted(times)
                assert len(set(times)) == len(times), f"frozen stream time: {times}"
        finally:
            await client.close()
            await server.stop()

    run(main())
