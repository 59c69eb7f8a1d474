"""A tiny RTSP test server for tests/test_live_source.py.

Run with the *system* python, which has PyGObject and GStreamer's RTSP server
(install them with scripts/ci-system-deps.sh)::

    /usr/bin/python3 tests/rtsp_server.py PORT

Serves ``rtsp://127.0.0.1:PORT/test``: a live 320x240 10 fps H.264 test
pattern (a bouncing ball), one shared pipeline for every client. Listens on
127.0.0.1 only. Prints ``READY`` (flushed) once the server is attached to the
main loop, and exits cleanly on SIGTERM or SIGINT. Exits with status 2 and a
message on stderr when GStreamer or the RTSP server cannot be loaded or the
port cannot be bound.
"""

from __future__ import annotations

import signal
import sys

LAUNCH = (
    "( videotestsrc is-live=true pattern=ball "
    "! video/x-raw,width=320,height=240,framerate=10/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 "
    "! rtph264pay name=pay0 pt=96 )"
)
MOUNT = "/test"
HOST = "127.0.0.1"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit() or not 0 < int(argv[1]) < 65536:
        print(f"usage: {argv[0]} PORT", file=sys.stderr)
        return 2
    port = int(argv[1])
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer
    except (ImportError, ValueError) as exc:
        print(f"rtsp_server: cannot load GStreamer RTSP server via gi: {exc}", file=sys.stderr)
        return 2

    Gst.init(None)
    missing = [name for name in ("videotestsrc", "x264enc", "rtph264pay") if Gst.ElementFactory.find(name) is None]
    if missing:
        print(f"rtsp_server: missing GStreamer elements: {', '.join(missing)}", file=sys.stderr)
        return 2

    server = GstRtspServer.RTSPServer()
    server.set_address(HOST)
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(LAUNCH)
    factory.set_shared(True)
    server.get_mount_points().add_factory(MOUNT, factory)

    loop = GLib.MainLoop()
    try:
        source_id = server.attach(None)
    except GLib.Error as exc:
        print(f"rtsp_server: cannot listen on {HOST}:{port}: {exc}", file=sys.stderr)
        return 2
    if source_id == 0:
        print(f"rtsp_server: cannot listen on {HOST}:{port}", file=sys.stderr)
        return 2

    def quit_loop(*_args: object) -> bool:
        loop.quit()
        return GLib.SOURCE_REMOVE

    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, quit_loop)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, quit_loop)

    print("READY", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
