"""The realtime API on the wire: the smallest program that talks to a streamvlm server.

    streamvlm serve --model shapeworld                # in another terminal (ws://127.0.0.1:8765)
    python demos/websocket_integration.py

The shipped ShapeWorld model (trained by the project on a synthetic world of moving shapes) answers
questions about ShapeWorld frames; any other model works too, but a random-weight preset answers
noise (and the small ShapeWorld model is often wrong: the ground truth is printed beside each answer).
The program uses nothing but a WebSocket library and the binary frame format of
docs/protocol.md: it asks the server to answer questions in turn rather than let a new one interrupt
the running answer, sends twelve seconds of a ShapeWorld episode as binary frame messages paced like a
camera (four times real time by default; the server reads the newest frame when it is busy, so a
burst of frames keeps only the last ones), asks three questions right after the last frame (no
waiting: the frames sent before a question are what it is answered from), and
prints every event the server sends back, raw, until every answer is done. Then it prints each
answer with the frames it rests on and the ground truth. Answers are matched to questions by
``client_event_id``, the ``event_id`` of the ``response.create`` they answer, never by arrival order.

Port it to any language that has a WebSocket client and a JPEG encoder
(``streamvlm.protocol.encode_frame`` builds the 16-byte header plus the JPEG; it is short enough to
rewrite).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from urllib.parse import urlsplit

from websockets.asyncio.client import connect

from streamvlm.protocol import encode_frame
from streamvlm.shapeworld import make_episode

SEED, SECONDS, SIZE = 7, 12, 64  # a held-out episode: a green triangle is alone on screen from 9 s to 12 s
QUESTIONS = [  # (question, what the episode says)
    ("How many shapes are visible?", "1"),
    ("When did the green triangle appear?", "9"),
    ("What colour was the first shape?", "yellow"),
]


async def run(url: str, token: str | None, speed: float) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/v1/realtime"
    episode = make_episode(SEED, duration_s=float(SECONDS), fps=1.0, size=SIZE)
    async with connect(url, additional_headers=headers) as ws:
        print("<-", await ws.recv())  # session.created: the session id, the model and the limits
        # Answer every question in turn (by default a new question interrupts the one being answered).
        update = {"type": "session.update", "event_id": "setup", "session": {"interrupt": False}}
        await ws.send(json.dumps(update))
        print("->", json.dumps(update))
        loop = asyncio.get_running_loop()
        start = loop.time()
        for t, image in episode.frames():
            if speed > 0:  # a camera delivers frame t at t seconds (here t / speed)
                await asyncio.sleep(max(0.0, start + t / speed - loop.time()))
            await ws.send(encode_frame(image, pts_s=t, source_id="shapeworld"))  # binary: SVF1 header + JPEG
            print(f"-> <binary frame pts={t:.1f}s>")
        asked: dict[str, str] = {}  # response.create event_id -> question
        items: set[str] = set()
        for n, (question, _) in enumerate(QUESTIONS, 1):
            item = {"type": "conversation.item.create", "event_id": f"item{n}",
                    "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}}
            create = {"type": "response.create", "event_id": f"ask{n}", "response": {"max_output_tokens": 12}}
            for event in (item, create):
                await ws.send(json.dumps(event))
                print("->", json.dumps(event))
            asked[create["event_id"]] = question
            items.add(item["event_id"])
        answers: dict[str, dict] = {}
        async for message in ws:
            print("<-", message)
            event = json.loads(message)
            if event["type"] == "response.done" and event["response"].get("trigger") == "user":
                response = event["response"]
                # (a server older than client_event_id answers in order: take the first unanswered question)
                key = response["client_event_id"] if "client_event_id" in response else next(k for k in asked if k not in answers)
                if key in asked:
                    answers[key] = response
            elif event["type"] == "error" and event["error"].get("event_id") in {*asked, *items, "setup"}:
                print(f"refused: {event['error']['code']}: {event['error']['message']}")
                return
            if len(answers) == len(asked):
                break
    print()
    for (event_id, question), (_, truth) in zip(asked.items(), QUESTIONS):
        response = answers[event_id]
        evidence = [e["pts_s"] for e in response.get("evidence", [])]
        frames = f"{len(evidence)} frames, {evidence[0]:.0f}-{evidence[-1]:.0f} s" if evidence else "no video"
        print(f"{question}  ->  {response.get('output_text', '').strip()!r}  [{response['status']}; {frames}; "
              f"the episode says {truth!r}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server address (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")
    parser.add_argument("--speed", type=float, default=4.0,
                        help="frames sent at this many times real time; 0 = all at once (default: %(default)s)")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.token, args.speed))


if __name__ == "__main__":
    main()
