"""Keeps the local stack's processes running: starts them in order, restarts one that dies.

Each child is started and waited on until ready, in order. After that, a child that exits is
reported (with the tail of its log) and started again after a backoff that doubles from 1 s up
to 30 s and resets once a child has stayed up for a minute. A child may also say it is broken
while it runs (Triton whose model stub died): it is then killed and restarted the same way.
What runs where is written to a state file that `cloudach status` reads. stop_all() stops the
children in reverse order.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tools.launcher.probes import ProbeSpec, check, wait_ready
from tools.launcher.process import log_tail, reap_group, stop

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0


@dataclass
class Child:
    name: str
    address: str  # shown by `cloudach status`
    start: Callable[[], subprocess.Popen]
    probe: ProbeSpec
    log: pathlib.Path
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 35.0
    #: asked of a ready child at each tick: why it is broken though it runs, or None
    broken: Callable[[subprocess.Popen], str | None] | None = None

    process: subprocess.Popen | None = field(default=None, init=False)
    restarts: int = field(default=0, init=False)
    ready: bool = field(default=False, init=False)
    started_at: float = field(default=0.0, init=False)
    backoff_s: float = field(default=FIRST_BACKOFF_S, init=False)
    restart_at: float | None = field(default=None, init=False)

    def launch(self) -> None:
        self.process = self.start()
        self.started_at = time.monotonic()
        self.ready = False


class StartError(RuntimeError):
    pass


class Supervisor:
    def __init__(self, children: list[Child], state_file: pathlib.Path,
                 say: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.children = children
        self.state_file = state_file
        self.say = say
        self.stopping = threading.Event()

    def start_all(self) -> None:
        """Starts each child in order and waits until it is ready; raises StartError with its log's tail."""
        for child in self.children:
            child.launch()
            self._write_state()
            try:
                wait_ready(lambda: check(child.probe), child.name, child.start_timeout_s, child.process, self.stopping.is_set)
            except (RuntimeError, TimeoutError) as failure:
                raise StartError(f"{failure}; the end of {child.log}:\n{log_tail(child.log)}") from None
            child.ready = True
            self._write_state()
            self.say(f"  {child.name} ready: {child.address}")

    def watch(self, tick_s: float = 0.5) -> None:
        """Until stop is requested: restarts children that exit, notes when they are ready again."""
        while not self.stopping.wait(tick_s):
            for child in self.children:
                if self.stopping.is_set():
                    return
                self._tend(child, time.monotonic())

    def _tend(self, child: Child, now: float) -> None:
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                child.launch()
                self.say(f"  {child.name} restarted (restart {child.restarts}, pid {child.process.pid})")
                self._write_state()
            return
        code = child.process.poll()
        if code is None and child.ready and child.broken is not None:
            reason = child.broken(child.process)
            if reason is not None:
                self.say(f"!! {child.name} is broken: {reason}; killing it")
                stop(child.process, timeout_s=0)
                code = child.process.returncode
        if code is not None:
            reap_group(child.process)
            child.ready = False
            if now - child.started_at >= STABLE_AFTER_S:
                child.backoff_s = FIRST_BACKOFF_S
            child.restart_at = now + child.backoff_s
            self.say(f"!! {child.name} exited with code {code}; restarting in {child.backoff_s:g}s. "
                     f"The end of {child.log}:\n{log_tail(child.log, 10)}")
            child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
            self._write_state()
        elif not child.ready and check(child.probe):
            child.ready = True
            self.say(f"  {child.name} ready again: {child.address}")
            self._write_state()

    def stop_all(self) -> None:
        self.stopping.set()
        for child in reversed(self.children):
            if child.process is not None:
                stop(child.process, child.stop_timeout_s)
        self.state_file.unlink(missing_ok=True)

    def _write_state(self) -> None:
        state = {
            "launcher_pid": os.getpid(),
            "services": [
                {"name": c.name, "address": c.address, "pid": c.process.pid if c.process else None,
                 "restarts": c.restarts, "probe": list(c.probe), "log": str(c.log)}
                for c in self.children
            ],
        }
        partial = self.state_file.with_suffix(".tmp")
        partial.write_text(json.dumps(state, indent=2))
        partial.replace(self.state_file)
