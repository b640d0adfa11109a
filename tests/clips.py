"""Small test clips made with PyAV: frames whose content is known, so a reader's output can be
compared with what was encoded; H.264, any size in a lossless codec, and the two timestamp
breakages of real files (AVI with packed B-frames, an MP4 whose pts were written as its dts)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

VOP_START = b"\x00\x00\x01\xb6"  # MPEG-4 part 2 video object plane (one coded picture)
DIVX_PACKED = b"\x00\x00\x01\xb2DivX503b1393p"  # user data: DivX 5, 'p' = packed bitstream


def picture(i: int, w: int, h: int) -> np.ndarray:
    """Frame i: a gradient whose green changes with i and a white square that moves."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 1] = (i * 6) % 256
    img[..., 2] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    side = max(1, min(h, w) // 3)
    x = (i * 3) % max(1, w - side)
    img[h // 3 : h // 3 + side, x : x + side] = 255
    return img


def write_video(path: Path, pictures: list[np.ndarray], fps: int, codec: str = "libx264", fmt: str | None = None,
                pix_fmt: str = "yuv420p", codec_options: dict | None = None,
                options: dict | None = None) -> list[np.ndarray]:
    """Encode RGB `pictures` (one size) with `codec` at `fps` (pts 0, 1, ...); returns them."""
    h, w = pictures[0].shape[:2]
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = codec_options or {}
        for i, img in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return pictures


def write_h264(path: Path, pictures: list[np.ndarray], fps: int, fmt: str | None = None,
               options: dict | None = None) -> list[np.ndarray]:
    """Encode RGB `pictures` (one size) as H.264 at `fps` (pts 0, 1, ...); returns them."""
    return write_video(path, pictures, fps, fmt=fmt, options=options,
                       codec_options={"preset": "ultrafast", "tune": "zerolatency"})


def write_packed_avi(path: Path, pictures: list[np.ndarray], fps: int) -> list[np.ndarray]:
    """MPEG-4 part 2 with B-frames in AVI as DivX/XviD packed them: each reference picture shares
    its chunk with the B-picture after it, and an empty VOP holds the freed slot. AVI keeps one
    timestamp per chunk, so the decoder hands out the pictures in display order labelled with the
    times of their chunks (1, 3, 2, 5, 4, ...), as in real xvid files."""
    plain = path.with_suffix(".plain.avi")
    write_video(plain, pictures, fps, codec="mpeg4", codec_options={"bf": "1"})
    with av.open(str(plain)) as src:
        template = src.streams.video[0]
        coded = [bytes(p) for p in src.demux(template) if p.size]
        first = coded[0].index(VOP_START)
        coded[0] = coded[0][:first] + DIVX_PACKED + coded[0][first:]
        chunks, k = [], 0
        while k < len(coded):
            if k + 1 < len(coded) and _vop_type(coded[k + 1]) == 2 and _vop_type(coded[k]) != 2:
                chunks += [coded[k] + coded[k + 1], _empty_vop(fps)]
                k += 2
            else:
                chunks.append(coded[k])
                k += 1
        with av.open(str(path), "w", format="avi") as out:
            stream = out.add_stream_from_template(template)
            for i, data in enumerate(chunks):
                packet = av.Packet(data)
                packet.pts = packet.dts = i
                packet.time_base, packet.stream = stream.time_base, stream
                out.mux(packet)
    plain.unlink()
    return pictures


def write_mp4_pts_as_dts(path: Path, pictures: list[np.ndarray], fps: int) -> list[np.ndarray]:
    """H.264 with B-frames in MP4, each packet's pts overwritten with its dts (a muxer that lost
    the composition offsets): the decoder's display-order frames carry decode-order times."""
    plain = path.with_suffix(".plain.mp4")
    write_video(plain, pictures, fps, codec_options={"preset": "ultrafast", "bf": "3"})
    with av.open(str(plain)) as src, av.open(str(path), "w") as out:
        template = src.streams.video[0]
        stream = out.add_stream_from_template(template)
        packets = [p for p in src.demux(template) if p.size]
        first = packets[0].dts
        for packet in packets:
            packet.pts = packet.dts = packet.dts - first
            packet.stream = stream
            out.mux(packet)
    plain.unlink()
    return pictures


def _vop_type(data: bytes) -> int:
    """The coding type of the first VOP in `data`: 0 I, 1 P, 2 B."""
    return data[data.index(VOP_START) + 4] >> 6


def _empty_vop(fps: int) -> bytes:
    """A not-coded P-VOP (the N-VOP packers wrote), its time increment sized for resolution `fps`."""
    bits = "01" + "0" + "1" + "0" * max(1, (fps - 1).bit_length()) + "1" + "0"
    bits += "0" + "1" * (-(len(bits) + 1) % 8)
    return VOP_START + int(bits, 2).to_bytes(len(bits) // 8, "big")
