"""`python -m bench.tokenize_stall`: how long tokenizing a long prompt stalls inference_svc's event
loop, inline against in a worker thread (what InferenceService does past OFF_LOOP_CHARS).

A ticker on the loop wakes every millisecond; the figure is its longest gap while one prompt is
planned (rendered, tokenized, refused for the context window), ten times each way.
"""

from __future__ import annotations

import asyncio
import time

from cloudach.errors import InvalidArgument
from cloudach.inference.v1 import inference_pb2 as pb
from inference_svc.config import InferenceConfig
from inference_svc.generation import plan_generation
from inference_svc.registry import load_registry

CHARS = 60_000  # under the CPU model's bound (2,048 tokens × 32 bytes), so it is tokenized


async def _worst_stall(plan, runs: int = 10) -> float:
    worst, running = 0.0, True

    async def tick() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    for _ in range(runs):
        try:
            await plan()
        except InvalidArgument:
            pass
        await asyncio.sleep(0.01)
    running = False
    await ticker
    return worst


async def main() -> None:
    registry = load_registry(InferenceConfig().models_file)
    text = ("The quick brown fox jumps over the lazy dog. " * (CHARS // 45 + 1))[:CHARS]
    request = pb.GenerateRequest(model=next(iter(registry)).id, messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)])

    async def inline() -> None:
        plan_generation(request, registry)

    async def threaded() -> None:
        await asyncio.to_thread(plan_generation, request, registry)

    for name, plan in (("inline", inline), ("worker thread", threaded)):
        print(f"{name}: longest event-loop stall {await _worst_stall(plan) * 1000:.1f} ms ({CHARS:,}-character prompt)")


if __name__ == "__main__":
    asyncio.run(main())
