"""Requests per caller, counted by the `limits` library: in this process's memory, or in a
Redis that every process using it shares."""

import math
import time

from graphql import GraphQLError
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from orderstream.infrastructure.web.graphql_http import Refusal


class RateLimited(Refusal):
    def __init__(self, retry_after: float, rate: float, burst: int) -> None:
        seconds = max(1, math.ceil(retry_after))  # Retry-After takes whole seconds
        super().__init__(429, f"Too many requests: try again in {seconds} s "
                              f"(at most {rate:g} a second on average, {burst} at once).",
                         "RATE_LIMITED", headers={"Retry-After": str(seconds)}, extensions={"retryAfter": seconds})

    def graphql_error(self) -> GraphQLError:
        """The refusal as the error of one operation, for a WebSocket that stays open."""
        return GraphQLError(self.reason, extensions={"code": self.code, **self.extensions})


class RateLimit:
    """`burst` requests at once per caller, and `rate` a second on average.

    `storage`: `memory://`, counted in this process, or a Redis URL (`redis://host:6379/0`),
    where every process with the same `prefix` draws on one budget per caller. The limit is
    `burst` requests in a window of burst/rate seconds, rounded up to whole seconds (limits
    counts in seconds): with a burst below one second's worth, the average is the burst a
    second. Counts expire two windows after a caller's last request, so memory is bounded by
    the callers of the last two windows.
    """

    def __init__(self, rate: float, burst: int, storage: str = "memory://", prefix: str = "orderstream") -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs a rate above 0 and a burst of at least 1")
        self.rate, self.burst = rate, burst
        self.window = max(1, math.ceil(burst / rate))
        self.item = RateLimitItemPerSecond(burst, self.window, namespace=prefix)
        self.storage: Storage = (MemoryStorage() if storage == "memory://" else
                                 RedisStorage(f"async+{storage}", implementation="redispy", key_prefix=prefix))
        # The sliding window counter rather than the moving window: two counters per caller
        # whatever the burst (the moving window keeps a timestamp per request, 200 a caller
        # by default, in memory and in Redis), and a caller who spent the burst gets requests
        # back at about `rate` a second, as from the token bucket this replaced, rather than
        # the whole burst at once a window later.
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)

    async def take(self, caller: str) -> float:
        """Counts a request of `caller`: 0.0 if it may go ahead, else the seconds until one may.
        A refused request is not counted."""
        if await self.limiter.hit(self.item, caller):
            return 0.0
        stats = await self.limiter.get_window_stats(self.item, caller)
        # limits tells when, by time.time(), the next request may go ahead.
        return max(stats.reset_time - time.time(), 0.001)

    async def admit(self, caller: str) -> None:
        """Raises RateLimited unless `caller` may make a request now."""
        wait = await self.take(caller)
        if wait:
            raise RateLimited(wait, self.rate, self.burst)
