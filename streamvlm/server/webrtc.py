"""WebRTC ingest (aiortc): a browser's or program's camera track feeds the same path as socket frames.

Signaling travels over the realtime WebSocket (``webrtc.offer`` / ``webrtc.answer``); no STUN server
is used unless ICE servers are configured. A server bound to loopback offers loopback ICE candidates
only (aioice skips 127.0.0.1 by default, and would otherwise offer every interface), so traffic never
leaves the machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

__all__ = ["accept_offer", "loopback_ice_only"]

_loopback_patched = False


def loopback_ice_only() -> None:
    """Make ICE gather 127.0.0.1 host candidates only (process-wide; for servers bound to loopback)."""
    global _loopback_patched
    if not _loopback_patched:
        import aioice.ice

        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []
        _loopback_patched = True


async def accept_offer(
    sdp: str, on_frame: Callable[[np.ndarray, float], None], *, ice_servers: tuple[str, ...] = ()
) -> tuple[str, RTCPeerConnection]:
    """Answer an SDP offer; every frame of its video track goes to ``on_frame(rgb, pts_s)``.

    Returns the answer SDP and the peer connection (close it when the session ends).
    """
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in ice_servers]))
    tasks: set[asyncio.Task] = set()

    async def consume(track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pts = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else 0.0
            on_frame(frame.to_ndarray(format="rgb24"), pts)

    @pc.on("track")
    def on_track(track) -> None:
        if track.kind == "video":
            task = asyncio.ensure_future(consume(track))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return pc.localDescription.sdp, pc
