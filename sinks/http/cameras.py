"""The served cameras as the HTTP API shows them, and the pictures the service keeps of them:
each camera's thumbnails of held groups (for its contact sheet, the same keeping as the visuals
sink) and the snapshots of the latest watch events (the frame as it was when the watch fired).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from urllib.parse import quote

from sinks.visuals import Thumbnails, contact_sheet, png, timeline
from stream.camera_api import CameraService
from stream.errors import RequestError
from stream.events import Event, GroupAdded, WatchFired

MAX_SNAPSHOTS = 32  # watch-event snapshots kept, all cameras together (the newest)
RENDERS_AT_ONCE = 2  # pictures drawn at the same time; more requests wait their turn
PICTURES = {"contact_sheet": contact_sheet, "timeline": timeline}


def camera_path(name: str) -> str:
    return f"/api/cameras/{quote(name, safe='')}"


class ServedCameras:
    def __init__(self, cameras: Mapping[str, CameraService], max_thumbnails: int = 256, refresh_every: int = 32):
        for name, camera in cameras.items():
            if camera.name != name:
                raise ValueError(f"camera {camera.name!r} is served under the name {name!r}")
        self.cameras = dict(cameras)
        self.thumbnails = {name: Thumbnails(cam.memory_map, max_thumbnails, refresh_every)
                           for name, cam in self.cameras.items()}
        self._snapshots: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._renders = asyncio.Semaphore(RENDERS_AT_ONCE)

    @property
    def names(self) -> list[str]:
        return list(self.cameras)

    def __contains__(self, name: object) -> bool:
        return name in self.cameras

    def get(self, name: str) -> CameraService:
        camera = self.cameras.get(name)
        if camera is None:
            raise RequestError("unknown_camera", f"no camera named {name[:100]!r}; cameras: {', '.join(self.cameras)}")
        return camera

    def describe(self, name: str) -> dict:
        """CAMERA in the API: its name, health (the source's state), status and watches."""
        camera = self.get(name)
        status = camera.status()
        return {"name": name, "health": status.source.get("state"), "status": status.to_dict(),
                "watches": camera.watches.describe()}

    def watches(self, name: str) -> dict:
        return {"camera": name, "watches": self.get(name).watches.describe()}

    async def keep(self, event: Event) -> None:
        """Keep what a later request may ask for: a group's thumbnail, a watch event's snapshot."""
        if isinstance(event, GroupAdded):
            await self.thumbnails[event.camera].add(event)
        elif isinstance(event, WatchFired) and event.snapshot:
            self._snapshots[(event.camera, event.id)] = event.snapshot
            while len(self._snapshots) > MAX_SNAPSHOTS:
                self._snapshots.popitem(last=False)

    def snapshot_url(self, event: WatchFired) -> str | None:
        if not event.snapshot:
            return None
        return f"{camera_path(event.camera)}/snapshots/{quote(event.id, safe='')}.jpg"

    def snapshot(self, name: str, event_id: str) -> bytes:
        self.get(name)
        jpeg = self._snapshots.get((name, event_id))
        if jpeg is None:
            raise RequestError("unknown_snapshot", f"no snapshot of event {event_id[:100]!r} on camera {name!r} "
                               f"(the newest {MAX_SNAPSHOTS} are kept)")
        return jpeg

    async def frame(self, name: str) -> bytes:
        """The newest frame as JPEG (encoded off the event loop)."""
        jpeg = await asyncio.to_thread(self.get(name).latest_jpeg)
        if jpeg is None:
            raise RequestError("no_frame", f"camera {name!r} has no frame yet")
        return jpeg

    async def picture(self, name: str, kind: str) -> bytes:
        """`kind` ("contact_sheet" or "timeline") of what the memory holds now, as PNG, drawn
        off the event loop; `empty_memory` while it holds nothing."""
        camera, draw = self.get(name), PICTURES[kind]
        kept = self.thumbnails[name].kept()

        def render() -> bytes | None:
            memory = camera.memory_map()
            if memory.group.size == 0:
                return None
            return png(contact_sheet(memory, kept) if draw is contact_sheet else timeline(memory))

        async with self._renders:
            data = await asyncio.to_thread(render)
        if data is None:
            raise RequestError("empty_memory", f"camera {name!r}'s memory holds nothing yet")
        return data
