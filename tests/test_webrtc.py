"""Two real aiortc peers on 127.0.0.1: a client's video track reaches the model through the server."""

from __future__ import annotations

import asyncio
import fractions
import json

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from av import VideoFrame
from websockets.asyncio.client import connect

from streamvlm.server.webrtc import loopback_ice_only

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
