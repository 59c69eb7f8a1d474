"""streamvlm_client: talk to a streamvlm server over its realtime WebSocket API without a model stack.

:class:`AsyncClient` for asyncio code, :class:`Client` for blocking code; both send frames, ask
questions, manage watches and read every server event (docs/protocol.md). Importing this package
never imports torch or transformers.
"""

from __future__ import annotations

from .client import DEFAULT_URL, REALTIME_PATH, AsyncClient, Client, ClientError, realtime_url

__all__ = ["AsyncClient", "Client", "ClientError", "DEFAULT_URL", "REALTIME_PATH", "realtime_url"]
