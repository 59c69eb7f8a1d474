"""Talk about a live camera through a running streamvlm server.

    streamvlm serve --model M                        # in another terminal (ws://127.0.0.1:8765); M a real checkpoint
    python demos/webcam_chat.py                      # streams webcam 0
    python demos/webcam_chat.py --source clip.mp4    # or a file played as a camera, or an rtsp:// URL

Frames go to the server at --fps (latest wins: a slow link drops frames, never queues them). Type a
question and press Enter: the answer streams in, followed by the times of the frames it rests on ("no
video yet" when it rests on none). A dropped connection is resumed with the latest handle before
the next question. Ctrl-D (end of input) quits. Uses the blocking client, so no asyncio is needed.
"""

from __future__ import annotations

import argparse
import sys

from streamvlm_client import Client, ClientError

from streamvlm.ingest import LiveSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server address (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")
    parser.add_argument("--source", default="0", help="webcam index, video file or rtsp:// URL (default: webcam 0)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second sent (default: %(default)s)")
    args = parser.parse_args()

    source = LiveSource(int(args.source) if args.source.isdigit() else args.source).start()  # runs until the end,
    try:  # across reconnects (stream_camera leaves a source it did not start running)
        chat(source, args)
    finally:
        source.stop()


def chat(source: LiveSource, args: argparse.Namespace) -> None:
    try:
        client = Client(args.url, args.token)
    except ClientError as exc:
        raise SystemExit(f"webcam_chat: {exc}") from None
    with client:
        print(f"session {client.session_id} on {args.url}; streaming {source!r} at {args.fps:g} fps")
        streaming = client.stream_camera(source, args.fps)
        print("Ask a question (Ctrl-D to quit):")
        for line in sys.stdin:
            question = line.strip()
            if not question:
                continue
            if not client.connected:
                try:
                    client.reconnect()
                except ClientError as exc:
                    raise SystemExit(f"webcam_chat: the connection ended and cannot be resumed ({exc})") from None
                print(f"(resumed session {client.session_id})")
                streaming = client.stream_camera(source, args.fps)
            elif streaming.done():
                print(f"(the source stopped: {streaming.exception() or 'end of stream'})")
            try:
                print("> ", end="", flush=True)
                reply = client.answer(question, on_delta=lambda text: print(text, end="", flush=True))
            except ClientError as exc:
                print(f"\n({exc.code}: {exc.message})")
                continue
            no_video = reply.get("no_video", not reply["evidence"])
            seen = "no video yet" if no_video else ", ".join(f"{e['pts_s']:.1f}s" for e in reply["evidence"][-8:])
            print(f"\n  [{reply['status']}; evidence: {seen}; first text after {reply['ttft_s'] or 0:.2f} s]")
        streaming.cancel()

if __name__ == "__main__":
    main()
