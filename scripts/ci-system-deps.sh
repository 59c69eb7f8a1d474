#!/usr/bin/env bash
# Installs the Debian packages that the tests need:
#  - tests/test_live_source.py: a GStreamer RTSP server (driven from the system python through
#    PyGObject) and the elements its launch line uses (videotestsrc: plugins-base,
#    rtph264pay: plugins-good, x264enc: plugins-ugly);
#  - tests/test_browser.py: Debian's chromium (/usr/bin/chromium), driven headless by Playwright
#    with a fake camera. Playwright's own browser download is never used.
#
# Idempotent: does nothing when the system python can already load GstRtspServer and find
# every element, and /usr/bin/chromium exists. Run as root (CI images run as root; otherwise use sudo).
set -euo pipefail

PACKAGES=(
    gstreamer1.0-rtsp
    gir1.2-gst-rtsp-server-1.0
    python3-gi
    gstreamer1.0-plugins-base
    gstreamer1.0-plugins-good
    gstreamer1.0-plugins-ugly
    gstreamer1.0-tools
    chromium
)

SYSTEM_PYTHON=${SYSTEM_PYTHON:-/usr/bin/python3}
CHROMIUM=/usr/bin/chromium

deps_ok() {
    [ -x "$CHROMIUM" ] || return 1
    [ -x "$SYSTEM_PYTHON" ] || return 1
    "$SYSTEM_PYTHON" - <<'PY' >/dev/null 2>&1
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer  # noqa: F401
Gst.init(None)
missing = [e for e in ("videotestsrc", "x264enc", "rtph264pay") if Gst.ElementFactory.find(e) is None]
raise SystemExit(1 if missing else 0)
PY
}

if deps_ok; then
    echo "ci-system-deps: GStreamer RTSP server, plugins and chromium already available; nothing to install"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ci-system-deps: must run as root to install: ${PACKAGES[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${PACKAGES[@]}"

if [ ! -x "$CHROMIUM" ]; then
    echo "ci-system-deps: packages installed but $CHROMIUM is missing" >&2
    exit 1
fi
if ! deps_ok; then
    echo "ci-system-deps: packages installed but $SYSTEM_PYTHON still cannot load GstRtspServer" \
         "or find videotestsrc/x264enc/rtph264pay" >&2
    exit 1
fi
echo "ci-system-deps: installed ${PACKAGES[*]}"
