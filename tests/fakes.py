"""A fake engine with knobs, behind the same seam as TritonEngine (for fast, deterministic tests)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from inference_svc.engine import EngineRequest, Step

#: the log probability the fake gives every token it yields; alternatives follow, each 1 lower
FAKE_LOG_PROB = -0.25


@dataclass
class FakeEngine:
    """Yields `steps` (lists of token ids) one by one, `delay_s` apart, for each of the request's
    n sequences in turn; with log probs asked for, FAKE_LOG_PROB for each token and top
    alternatives of the next ids down.

    cached_tokens: the prompt tokens the first step says the model served from a cached prefix.

    fail_after: raise `error` after that many steps. Records every request, and whether the
    generation was cancelled (its iterator closed or its task cancelled before the end).
    """

    steps: Sequence[Sequence[int]] = ()
    delay_s: float = 0.0
    fail_after: int | None = None
    error: Exception | None = None
    ready: bool = True
    cached_tokens: int = 0
    requests: list[EngineRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)

    async def generate(self, request: EngineRequest) -> AsyncIterator[Step]:
        self.requests.append(request)
        done = False
        try:
            for n, ids in enumerate(self.steps):
                if self.fail_after is not None and n == self.fail_after:
                    raise self.error or RuntimeError("fake engine failure")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                for index in range(request.n):
                    step = self._step(request, list(ids), index)
                    yield dataclasses.replace(step, cached_tokens=self.cached_tokens) if n == 0 else step
            done = True
        finally:
            (self.completed if done else self.cancelled).append(request.request_id)

    @staticmethod
    def _step(request: EngineRequest, ids: list[int], index: int) -> Step:
        if not request.log_probs:
            return Step(ids, index)
        top = [[(t - k, FAKE_LOG_PROB - k) for k in range(request.top_log_probs)] for t in ids]
        return Step(ids, index, [FAKE_LOG_PROB] * len(ids), top if request.top_log_probs else None)

    async def model_ready(self, model: str) -> bool:
        return self.ready

    async def close(self) -> None:
        pass
