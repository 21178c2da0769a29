"""Retries with exponential backoff and full jitter, for the delivery backends.

Only transient failures are retried (a :class:`~pipeline.errors.MailpipeError`
whose ``transient`` is true, or an error the caller's classifier calls
transient); each retry is reported to ``on_retry`` so that it can be recorded
as a ticket event ``retrying`` with its reason. After the last attempt the
last error is raised.

    >>> policy = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)
    >>> calls = []
    >>> def flaky():
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise DeliveryError("busy", code=421, transient=True)
    ...     return "ok"
    >>> policy.call(flaky)
    'ok'
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pipeline.config import RetryConfig
from pipeline.errors import DeliveryError, MailpipeError  # noqa: F401 - the example uses it

__all__ = ["RetryPolicy", "retrying_event"]

T = TypeVar("T")


def retrying_event(reason: str, at: str) -> dict[str, str]:
    """A Yesmail-style ticket event for one retry (``003_…``: state ``retrying``)."""
    return {
        "state": "retrying",
        "message": f"Send email request is being retried because {reason}",
        "time": at,
    }


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryPolicy:
        return cls(cfg.attempts, cfg.base_delay, cfg.max_delay)

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """Seconds before retry ``attempt`` (1-based): full jitter over an exponential cap.

        A server's own hint (``Retry-After``) wins when it asks for longer.
        """
        cap = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        wait = random.uniform(0, cap)
        return max(wait, min(hint, self.max_delay)) if hint else wait

    @staticmethod
    def transient(exc: BaseException) -> bool:
        if isinstance(exc, MailpipeError):
            return exc.transient
        return isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError))

    def call(
        self, fn: Callable[[], T], on_retry: Callable[[int, BaseException], None] | None = None
    ) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if attempt == self.attempts or not self.transient(e):
                    raise
                if on_retry:
                    on_retry(attempt, e)
                time.sleep(self.delay(attempt, getattr(e, "retry_after", None)))
        raise AssertionError("unreachable")

    async def acall(
        self,
        fn: Callable[[], Awaitable[T]],
        on_retry: Callable[[int, BaseException], None] | None = None,
    ) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return await fn()
            except Exception as e:
                if attempt == self.attempts or not self.transient(e):
                    raise
                if on_retry:
                    on_retry(attempt, e)
                await asyncio.sleep(self.delay(attempt, getattr(e, "retry_after", None)))
        raise AssertionError("unreachable")
