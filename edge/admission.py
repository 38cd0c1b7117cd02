"""Admission: how many requests the edge serves at once. Past the limit a request is refused at
once with 503 and Retry-After, never queued, so an overloaded replica sheds load instead of
piling up memory and latency."""

from __future__ import annotations

from collections.abc import Callable

from edge.errors import overloaded


class Admission:
    """Counts requests in flight; beyond the limit new ones are refused at once (503)."""

    def __init__(self, limit: int, on_reject: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.active = 0
        self._on_reject = on_reject

    def __enter__(self) -> Admission:
        if self.active >= self.limit:
            self._on_reject()
            raise overloaded("The server is at capacity. Please retry shortly.")
        self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.active -= 1
