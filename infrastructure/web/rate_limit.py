"""Requests per caller: a token bucket each, in memory, per process."""

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from orderstream.infrastructure.web.graphql_http import Refusal


class RateLimited(Refusal):
    def __init__(self, retry_after: float, rate: float, burst: int) -> None:
        seconds = max(1, math.ceil(retry_after))  # Retry-After takes whole seconds
        super().__init__(429, f"Too many requests: try again in {seconds} s "
                              f"(at most {rate:g} a second on average, {burst} at once).",
                         "RATE_LIMITED", headers={"Retry-After": str(seconds)}, extensions={"retryAfter": seconds})


class RateLimit:
    """A token bucket per caller: `burst` requests at once, refilled at `rate` a second.

    Memory stays bounded. Buckets are kept least recently used first, and one idle long
    enough to have filled up again is dropped, since a new bucket is the same. Past
    `max_callers` the least recently used goes even if not yet full: under a flood of
    distinct callers, one of them may get a fresh bucket a little early.
    """

    def __init__(self, rate: float, burst: int, max_callers: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs a rate above 0 and a burst of at least 1")
        self.rate, self.burst, self.max_callers, self.clock = rate, burst, max_callers, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, as of)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, caller: str) -> float:
        """Takes a token from `caller`'s bucket: 0.0 if there was one, else the seconds until
        there will be."""
        now = self.clock()
        tokens, as_of = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - as_of) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[caller] = (tokens - 1 if tokens >= 1 else tokens, now)
        self._drop_idle(now)
        return wait

    def admit(self, caller: str) -> None:
        """Raises RateLimited unless `caller` may make a request now."""
        wait = self.take(caller)
        if wait:
            raise RateLimited(wait, self.rate, self.burst)

    def _drop_idle(self, now: float) -> None:
        refilled = self.burst / self.rate  # seconds for an empty bucket to fill up
        while self._buckets:
            tokens, as_of = next(iter(self._buckets.values()))
            if len(self._buckets) <= self.max_callers and now - as_of < refilled:
                return
            self._buckets.popitem(last=False)
