"""The realtime API on the wire: the smallest program that talks to a streamvlm server.

    streamvlm serve                                   # in another terminal (ws://127.0.0.1:8765)
    python demos/websocket_integration.py

It uses nothing but a WebSocket library and the binary frame format of docs/protocol.md: it sends a
few synthetic numpy frames as binary messages, asks one question with two JSON events, and prints
every event the server sends back, raw, until the answer is done. Port it to any language that has
a WebSocket client and a JPEG encoder (``streamvlm.protocol.encode_frame`` builds the 16-byte header
plus the JPEG; it is short enough to rewrite).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.client import connect

from streamvlm.protocol import encode_frame


def synthetic_frame(i: int) -> np.ndarray:
    """A 240x320 RGB frame: a red square moving over grey."""
    image = np.full((240, 320, 3), 90, dtype=np.uint8)
    x = 20 + 30 * i
    image[80:160, x:x + 80] = (220, 30, 30)
    return image


async def run(url: str, question: str, token: str | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/v1/realtime"
    async with connect(url, additional_headers=headers) as ws:
        print("<-", await ws.recv())  # session.created: the session id and the limits
        for i in range(6):
            await ws.send(encode_frame(synthetic_frame(i), pts_s=0.5 * i, source_id="demo"))  # binary: SVF1 header + JPEG
            print(f"-> <binary frame pts={0.5 * i:.1f}s>")
        for event in (
            {"type": "conversation.item.create", "event_id": "q1",
             "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}},
            {"type": "response.create", "event_id": "q2", "response": {"max_output_tokens": 32}},
        ):
            await ws.send(json.dumps(event))
            print("->", json.dumps(event))
        async for message in ws:
            print("<-", message)
            event = json.loads(message)
            if event["type"] == "response.done" or (event["type"] == "error" and event["error"]["event_id"] in ("q1", "q2")):
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server address (default: %(default)s)")
    parser.add_argument("--question", default="Where is the red square going?")
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.question, args.token))


if __name__ == "__main__":
    main()
