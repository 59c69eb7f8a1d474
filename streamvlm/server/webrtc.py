"""WebRTC ingest (aiortc): a browser's or program's camera track feeds the same path as socket frames.

Signaling travels over the realtime WebSocket (``webrtc.offer`` / ``webrtc.answer``); no STUN server
is used unless ICE servers are configured. A server bound to loopback offers loopback ICE candidates
only (aioice skips 127.0.0.1 by default, and would otherwise offer every interface), so traffic never
leaves the machine.

Timing: this module stamps nothing. Each frame is handed on with the track's own timestamp (RTP ticks
and their clock rate, as the receiver gives them: RFC 3550 timestamps start at a random value and
wrap at 2**32) and the time it was received; the caller turns them into stream time with
:class:`streamvlm.ingest.clock.SessionClock` (``stamp_rtp``), see docs/clocks.md. Rate limits are
the caller's too: every decoded frame of the track is handed on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from fractions import Fraction

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

__all__ = ["FrameCallback", "accept_offer", "loopback_ice_only", "rtp_time"]

#: ``on_frame(rgb, timestamp, clock_rate, received_s)``: an HxWx3 uint8 RGB frame, its RTP timestamp in
#: ticks at ``clock_rate`` Hz (both None when the frame carries no timestamp), and the receive time in
#: seconds on the server's monotonic clock.
FrameCallback = Callable[[np.ndarray, int | None, int | None, float], None]

_loopback_patched = False


def loopback_ice_only() -> None:
    """Make ICE gather 127.0.0.1 host candidates only (process-wide; for servers bound to loopback)."""
    global _loopback_patched
    if not _loopback_patched:
        import aioice.ice

        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []
        _loopback_patched = True


def rtp_time(pts: int | None, time_base: Fraction | None) -> tuple[int | None, int | None]:
    """A decoded frame's ``pts`` and ``time_base`` as (ticks, clock rate in Hz), or (None, None) without them.

    aiortc gives video frames ``time_base = 1/90000`` (the RTP video clock) and ``pts`` in those
    ticks; a time base ``n/d`` becomes ``pts * n`` ticks at ``d`` Hz, exactly.
    """
    if pts is None or not time_base:
        return None, None
    base = Fraction(time_base)
    if base <= 0:
        return None, None
    return int(pts) * base.numerator, base.denominator


async def accept_offer(
    sdp: str, on_frame: FrameCallback, *, ice_servers: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic
) -> tuple[str, RTCPeerConnection]:
    """Answer an SDP offer; every frame of its video track goes to ``on_frame(rgb, timestamp, clock_rate, received_s)``.

    ``timestamp``/``clock_rate`` are the track's own time (see :func:`rtp_time`), ``received_s`` is
    ``clock()`` when the frame came out of the decoder. Stamp the frame with
    ``session_clock.stamp_rtp("webrtc", timestamp, clock_rate, received_s)``. Returns the answer SDP
    and the peer connection (close it when the session ends).
    """
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in ice_servers]))
    tasks: set[asyncio.Task] = set()

    async def consume(track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            received = clock()
            timestamp, clock_rate = rtp_time(frame.pts, frame.time_base)
            on_frame(frame.to_ndarray(format="rgb24"), timestamp, clock_rate, received)

    @pc.on("track")
    def on_track(track) -> None:
        if track.kind == "video":
            task = asyncio.ensure_future(consume(track))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return pc.localDescription.sdp, pc
