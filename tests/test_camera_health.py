"""A camera's status is live through an RTSP outage: at every tick `last_frame_age_s` rises and
`reconnects` counts, and after the camera comes back the age is near 0 again."""
from __future__ import annotations

from rtsp_fixtures import until

from stream.bus import Sink
from stream.camera import Camera
from stream.config import from_dict
from stream.events import Status


class StatusLog(Sink):
    def __init__(self):
        self.ticks: list[Status] = []

    async def handle(self, event):
        if isinstance(event, Status):
            self.ticks.append(event)


async def test_status_ticks_show_the_outage_and_the_recovery(rtsp_servers, vlm):
    server = rtsp_servers()
    cfg = from_dict({
        "name": "door",
        "source": {"kind": "rtsp", "url": server.url(), "open_timeout_s": 1.0, "stall_timeout_s": 1.0,
                   "reconnect_initial_s": 0.2, "reconnect_max_s": 0.2},
        "sampler": {"fps": 2.0},
        "memory": {"pruner": "recent", "capacity": 200, "recent_groups": 1},
        "output": {"status_interval_s": 0.25},
    })
    log = StatusLog()
    async with Camera(cfg, vlm) as cam:
        cam.bus.subscribe(log)
        await until(lambda: cam.memory.groups_seen >= 1, 30, "a group before the outage")
        server.kill()
        await until(lambda: cam.source.state == "reconnecting", 5, "the loss to be noticed")
        outage_from = len(log.ticks)
        await until(lambda: len(log.ticks) >= outage_from + 8, 10, "eight status ticks during the outage")
        outage = [t.source for t in log.ticks[outage_from:outage_from + 8]]
        server.start()
        await until(lambda: cam.source.state == "streaming", 10, "streaming after the restart")
        back_from = len(log.ticks)
        await until(lambda: len(log.ticks) >= back_from + 2, 5, "status ticks after the recovery")
        after = log.ticks[-1].source
    ages = [s["last_frame_age_s"] for s in outage]
    reconnects = [s["reconnects"] for s in outage]
    assert all(s["state"] == "reconnecting" for s in outage)
    assert all(b > a for a, b in zip(ages, ages[1:])), ages  # rising at every tick
    assert reconnects == sorted(reconnects) and reconnects[-1] - reconnects[0] >= 3, reconnects
    assert after["state"] == "streaming" and after["last_frame_age_s"] < 0.5
    assert after["reconnects"] >= reconnects[-1] and after["frames"] > outage[-1]["frames"]
