"""Token buckets for error replies: per destination topic and for the whole service.

MQTT 3/5 does not tell a subscriber who published a message, so a flooding client is known by
where its refusals would go (its `reply_to`, or the camera's error topic). Each destination may
get `burst` error replies at once and `rate_per_s` after that; all destinations together get
`GLOBAL_FACTOR` times as much. What is over the limit is not sent (the caller counts it).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

GLOBAL_FACTOR = 5
MAX_TRACKED = 4096  # destinations remembered; the least recently limited are forgotten


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float, now: float):
        self.rate = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.at = now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate_per_s
        self.burst = burst
        self.clock = clock
        self._all = TokenBucket(rate_per_s * GLOBAL_FACTOR, burst * GLOBAL_FACTOR, clock())
        self._by_topic: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, topic: str) -> bool:
        """Whether one more error reply may go to `topic` now."""
        now = self.clock()
        bucket = self._by_topic.get(topic)
        if bucket is None:
            bucket = self._by_topic[topic] = TokenBucket(self.rate, self.burst, now)
            if len(self._by_topic) > MAX_TRACKED:
                self._by_topic.popitem(last=False)
        self._by_topic.move_to_end(topic)
        return bucket.allow(now) and self._all.allow(now)
