"""Transports: the WebSocket server, the event log and the webhook sender. Thin layers over the cores."""
