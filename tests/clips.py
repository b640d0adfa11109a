"""Small H.264 test clips made with PyAV: frames whose content is known, so a reader's output
can be compared with what was encoded."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def picture(i: int, w: int, h: int) -> np.ndarray:
    """Frame i: a gradient whose green changes with i and a white square that moves."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 1] = (i * 6) % 256
    img[..., 2] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    x = (i * 3) % (w - h // 3)
    img[h // 3 : 2 * h // 3, x : x + h // 3] = 255
    return img


def write_h264(path: Path, pictures: list[np.ndarray], fps: int, fmt: str | None = None,
               options: dict | None = None) -> list[np.ndarray]:
    """Encode RGB `pictures` (one size) as H.264 at `fps` (pts 0, 1, ...); returns them."""
    h, w = pictures[0].shape[:2]
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i, img in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return pictures
