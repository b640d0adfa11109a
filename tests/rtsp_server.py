"""A small GStreamer RTSP server for the tests (run with Debian's /usr/bin/python3, which has gi).

Mounts: /live, a live H.264 test pattern (videotestsrc is-live) at --width x --height, --fps, a key
frame every --gop frames;
/clip, the H.264 MP4 given by --clip (each client gets its own playback, paced to real time; it
ends at the end of the file). Listens on 127.0.0.1:--port (0 = any free port), prints
"READY <port>" once it accepts connections, and exits cleanly on SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

H264_PAY = "rtph264pay name=pay0 pt=96 config-interval=1"


def live_launch(width: int, height: int, fps: int, gop: int) -> str:
    return (
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
        f"framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} "
        f"bframes=0 ! {H264_PAY} )"
    )


def clip_launch(path: str) -> str:
    location = path.replace("\\", "\\\\").replace('"', '\\"')
    return f'( filesrc location="{location}" ! qtdemux ! h264parse ! {H264_PAY} )'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=10, help="frames between key frames (first-frame latency)")
    parser.add_argument("--clip", default="")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    launches = {"/live": live_launch(args.width, args.height, args.fps, args.gop)}
    if args.clip:
        launches["/clip"] = clip_launch(args.clip)
    for path, launch in launches.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        factory.set_shared(path == "/live")
        mounts.add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
