"""Closed-loop load: `concurrency` clients each stream one request after another for `duration_s`,
while the stack's processes are sampled for CPU time and memory."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from bench.drivers import Driver, StreamResult

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _group_pids(pid: int) -> list[int]:
    """pid and its descendants (Triton's Python-backend stubs are its children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_and_rss(pid: int, descendants: bool = True) -> tuple[float, int]:
    """CPU seconds (user + system) and resident bytes of pid (and its descendants)."""
    cpu, rss = 0.0, 0
    for member in _group_pids(pid) if descendants else [pid]:
        try:
            fields = open(f"/proc/{member}/stat").read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            rss += int(open(f"/proc/{member}/statm").read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


CLIENT = "bench client"


def _usage(name: str, pid: int | tuple[int, ...]) -> tuple[float, int]:
    """A process's (or a tuple of processes', e.g. edge workers', summed) CPU seconds and memory."""
    if isinstance(pid, tuple):
        figures = [_usage(name, one) for one in pid]
        return sum(cpu for cpu, _ in figures), sum(rss for _, rss in figures)
    # the client's own process only: the stacks it starts are its children, measured apart
    return cpu_and_rss(pid, descendants=name != CLIENT)


@dataclass
class Run:
    label: str
    concurrency: int
    duration_s: float
    results: list[StreamResult]
    #: per process: CPU seconds spent during the run, resident bytes before and at the peak
    cpu_s: dict[str, float] = field(default_factory=dict)
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_peak: dict[str, int] = field(default_factory=dict)


async def run_load(driver: Driver, label: str, concurrency: int, duration_s: float, prompt: str, max_tokens: int,
                   processes: dict[str, int | tuple[int, ...]], warmup_s: float = 1.0, ramp_s: float = 0.0) -> Run:
    """processes: name -> pid to account CPU and memory for ("bench client" is this process).
    ramp_s spreads the clients' first requests (thousands of connects at once measure the accept queue)."""
    processes = {**processes, CLIENT: os.getpid()}
    await _drive(driver, min(concurrency, 8), warmup_s, prompt, max_tokens, [])  # connections, caches
    before = {name: _usage(name, pid) for name, pid in processes.items()}
    peak = {name: rss for name, (_, rss) in before.items()}
    results: list[StreamResult] = []
    sampling = asyncio.create_task(_sample_rss(processes, peak))
    started = time.perf_counter()
    await _drive(driver, concurrency, duration_s, prompt, max_tokens, results, ramp_s)
    elapsed = time.perf_counter() - started
    sampling.cancel()
    after = {name: _usage(name, pid) for name, pid in processes.items()}
    return Run(label, concurrency, elapsed, results,
               cpu_s={n: after[n][0] - before[n][0] for n in processes},
               rss_before={n: before[n][1] for n in processes}, rss_peak=peak)


async def _drive(driver: Driver, concurrency: int, duration_s: float, prompt: str, max_tokens: int,
                 results: list[StreamResult], ramp_s: float = 0.0) -> None:
    end = time.perf_counter() + duration_s

    async def client(index: int) -> None:
        if ramp_s:
            await asyncio.sleep(ramp_s * index / concurrency)
        while time.perf_counter() < end:
            results.append(await driver.stream(prompt, max_tokens))

    await asyncio.gather(*(client(i) for i in range(concurrency)))


async def _sample_rss(processes: dict[str, int], peak: dict[str, int]) -> None:
    while True:
        await asyncio.sleep(0.5)
        for name, pid in processes.items():
            peak[name] = max(peak[name], _usage(name, pid)[1])
