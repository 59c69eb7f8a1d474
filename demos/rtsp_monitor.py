"""Watch an RTSP camera for conditions and print each alert with its time.

    streamvlm serve --model M                         # in another terminal (ws://127.0.0.1:8765); M a real checkpoint
    python demos/rtsp_monitor.py rtsp://user:pass@cam.local/stream \\
        --alert "a person falls" --alert "door=the door is open" --cooldown 30

Try it here with the shipped ShapeWorld model and a ShapeWorld clip as the camera (about 15 s):

    streamvlm serve --model shapeworld
    python -c "from streamvlm.demo import write_episode_clip; write_episode_clip('clip.mkv', duration_s=8)"
    python demos/rtsp_monitor.py clip.mkv --alert "a yellow circle appears"    # it appears at 2 s

Each --alert is ``CONDITION`` or ``ID=CONDITION``. The camera is read by a reconnecting reader;
"camera online", outages and their reasons are printed as they happen, and every alert with the stream
time of the frame that fired it. Frames go to the server at --fps. When the server asks to move on
(``session.go_away``) or the connection drops, the client resumes the same session, watches included.
A camera runs until Ctrl-C; a file source ends at its end, after --linger seconds for the last alerts.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from streamvlm_client import AsyncClient, ClientError

from streamvlm.ingest import LiveSource


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


async def stream_until_end(client: AsyncClient, source: LiveSource, fps: float) -> None:
    """Keep frames flowing across reconnections of the client; return when the source ends (a file's end).

    A camera is reopened by the source itself after an outage, so for a camera this runs until Ctrl-C.
    """
    while source.running:
        try:
            await client.stream_camera(source, fps)
        except ClientError:
            await asyncio.sleep(0.5)  # the connection dropped: the event loop resumes it, then we go on


async def report_camera(source: LiveSource) -> None:
    """Print the camera's events as they happen: online, offline (with why), closed."""
    while True:
        for event in source.events():
            print(f"[{stamp()}] camera {event.kind}" + (f": {event.message}" if event.message else ""), flush=True)
        await asyncio.sleep(0.1)


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


async def report_alerts(client: AsyncClient, counts: dict[str, int]) -> None:
    """Print every alert with the frame that fired it; resume the session after a go_away or a drop."""
    while True:
        async for event in client.events():
            response = event.get("response") or {}
            if event["type"] == "response.done" and response.get("trigger") == "watch":
                alert = response["alert"]
                counts["alerts"] += 1
                print(f"[{stamp()}] ALERT {alert['watch_id']}: {alert['condition']} "
                      f"(the frame at stream time {alert['t']:.1f} s fired it)", flush=True)
            elif event["type"] == "error":
                print(f"[{stamp()}] server error: {event['error']['message']}", flush=True)
            elif event["type"] == "session.go_away":
                break
        await resume(client)


async def monitor(args: argparse.Namespace) -> None:
    watches = {}
    for i, spec in enumerate(args.alert, 1):
        watch_id, sep, condition = spec.partition("=")
        watches[watch_id.strip() if sep else f"alert{i}"] = (condition if sep else spec).strip()
    counts = {"alerts": 0}
    async with AsyncClient.connect(args.url, args.token) as client:
        for watch_id, condition in watches.items():
            await client.watch(watch_id, condition, cooldown_s=args.cooldown)
            print(f"watching {watch_id!r}: {condition}", flush=True)
        with LiveSource(args.camera) as source:
            helpers = [asyncio.create_task(report_camera(source)), asyncio.create_task(report_alerts(client, counts))]
            try:
                await stream_until_end(client, source, args.fps)
                await asyncio.sleep(args.linger)  # the server still reads the last frames: their alerts come now
            finally:
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
            for event in source.events():
                print(f"[{stamp()}] camera {event.kind}" + (f": {event.message}" if event.message else ""), flush=True)
            if source.failure is not None:
                raise SystemExit(f"rtsp_monitor: the camera failed: {source.failure}")
    print(f"[{stamp()}] the source ended: {counts['alerts']} alert(s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("camera", help="rtsp:// (or http://) URL, video file or webcam index")
    parser.add_argument("--alert", action="append", required=True, help="CONDITION or ID=CONDITION; repeatable")
    parser.add_argument("--cooldown", type=float, default=30.0, help="seconds between two alerts of a watch (default: %(default)s)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second sent (default: %(default)s)")
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server address (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")
    parser.add_argument("--linger", type=float, default=3.0,
                        help="seconds to wait for the last alerts after a file source ended (default: %(default)s)")
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
