"""Watch an RTSP camera for conditions and print each alert with its time.

    streamvlm serve                                   # in another terminal (ws://127.0.0.1:8765)
    python demos/rtsp_monitor.py rtsp://user:pass@cam.local/stream \\
        --alert "a person falls" --alert "door=the door is open" --cooldown 30

Each --alert is ``CONDITION`` or ``ID=CONDITION``. The camera is read by a reconnecting reader
(outages are printed); frames go to the server at --fps. When the server asks to move on
(``session.go_away``) or the connection drops, the client resumes the same session, watches included.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from streamvlm_client import AsyncClient, ClientError

from streamvlm.ingest import LiveSource


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


async def stream_forever(client: AsyncClient, source: LiveSource, fps: float) -> None:
    """Keep frames flowing across reconnections of the client and outages of the camera."""
    while True:
        try:
            await client.stream_camera(source, fps)
        except ClientError:
            pass  # the connection dropped: the event loop below resumes it
        for event in source.events():
            print(f"[{stamp()}] camera {event.kind}: {event.message}", flush=True)
        await asyncio.sleep(0.5)


async def resume(client: AsyncClient) -> None:
    """Resume the session on a new connection; retry while the server cannot be reached."""
    while True:
        print(f"[{stamp()}] resuming session {client.session_id} ...", flush=True)
        try:
            await client.reconnect()
            return
        except ClientError as exc:
            if exc.code != "connection_failed":
                raise  # e.g. invalid_resume_handle: the server restarted or the resume window passed
            await asyncio.sleep(2.0)


async def monitor(args: argparse.Namespace) -> None:
    watches = {}
    for i, spec in enumerate(args.alert, 1):
        watch_id, sep, condition = spec.partition("=")
        watches[watch_id.strip() if sep else f"alert{i}"] = (condition if sep else spec).strip()
    with LiveSource(args.camera) as source:
        async with AsyncClient.connect(args.url, args.token) as client:
            for watch_id, condition in watches.items():
                await client.watch(watch_id, condition, cooldown_s=args.cooldown)
                print(f"watching {watch_id!r}: {condition}")
            streaming = asyncio.create_task(stream_forever(client, source, args.fps))
            try:
                while True:
                    async for event in client.events():
                        response = event.get("response") or {}
                        if event["type"] == "response.done" and response.get("trigger") == "watch":
                            alert = response["alert"]
                            print(f"[{stamp()}] ALERT {alert['watch_id']}: {alert['condition']} "
                                  f"(frame at stream time {alert['t']:.1f} s)", flush=True)
                        elif event["type"] == "error":
                            print(f"[{stamp()}] server error: {event['error']['message']}", flush=True)
                        elif event["type"] == "session.go_away":
                            break
                    await resume(client)
            finally:
                streaming.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("camera", help="rtsp:// (or http://) URL, video file or webcam index")
    parser.add_argument("--alert", action="append", required=True, help="CONDITION or ID=CONDITION; repeatable")
    parser.add_argument("--cooldown", type=float, default=30.0, help="seconds between two alerts of a watch (default: %(default)s)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second sent (default: %(default)s)")
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server address (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")
    args = parser.parse_args()
    if args.camera.isdigit():
        args.camera = int(args.camera)
    try:
        asyncio.run(monitor(args))
    except KeyboardInterrupt:
        pass
    except ClientError as exc:
        raise SystemExit(f"rtsp_monitor: {exc}") from None


if __name__ == "__main__":
    main()
