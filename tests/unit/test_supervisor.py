"""The launcher's supervisor with real child processes (small HTTP servers)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from tools.launcher.ports import free_ports
from tools.launcher.process import spawn
from tools.launcher.supervisor import Child, StartError, Supervisor


def http_child(tmp_path, name: str, command: list[str] | None = None) -> Child:
    (port,) = free_ports(1)
    log = tmp_path / f"{name}.log"
    args = command or [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    return Child(name, f"127.0.0.1:{port}", lambda: spawn(args, log), ("http", f"http://127.0.0.1:{port}/"), log,
                 start_timeout_s=20, stop_timeout_s=5)


def wait_until(predicate, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def supervised(tmp_path):
    lines: list[str] = []
    children = [http_child(tmp_path, "first"), http_child(tmp_path, "second")]
    supervisor = Supervisor(children, tmp_path / "stack.json", say=lines.append)
    supervisor.start_all()
    watcher = threading.Thread(target=supervisor.watch, kwargs={"tick_s": 0.05})
    watcher.start()
    yield supervisor, lines
    supervisor.stop_all()
    watcher.join(10)


def test_a_child_that_dies_is_restarted_with_doubling_backoff(supervised, tmp_path):
    supervisor, lines = supervised
    second = supervisor.children[1]
    for restarts, backoff in ((1, "1s"), (2, "2s")):
        pid = second.process.pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: any(f"second exited with code -9; restarting in {backoff}" in line for line in lines))
        wait_until(lambda: second.ready and second.restarts == restarts)
        assert second.process.pid != pid
    state = {s["name"]: s for s in json.loads((tmp_path / "stack.json").read_text())["services"]}
    assert state["second"]["restarts"] == 2 and state["second"]["pid"] == second.process.pid
    assert state["first"]["restarts"] == 0
    assert lines.count("  second ready again: " + second.address) == 2


def test_a_running_child_that_says_it_is_broken_is_killed_and_restarted(tmp_path):
    lines: list[str] = []
    child = http_child(tmp_path, "server")
    marker = tmp_path / "broken"
    child.broken = lambda process: "its marker is there" if marker.exists() else None
    supervisor = Supervisor([child], tmp_path / "stack.json", say=lines.append)
    supervisor.start_all()
    watcher = threading.Thread(target=supervisor.watch, kwargs={"tick_s": 0.05})
    watcher.start()
    try:
        first = child.process
        time.sleep(0.3)
        assert child.restarts == 0 and first.poll() is None  # healthy: left alone
        marker.touch()
        wait_until(lambda: "!! server is broken: its marker is there; killing it" in lines)
        marker.unlink()
        wait_until(lambda: child.ready and child.restarts == 1)
        assert first.returncode == -signal.SIGKILL and child.process.pid != first.pid
    finally:
        supervisor.stop_all()
        watcher.join(10)


def test_stop_all_stops_every_child_and_removes_the_state(supervised, tmp_path):
    supervisor, _ = supervised
    processes = [c.process for c in supervisor.children]
    supervisor.stop_all()
    assert all(p.poll() is not None for p in processes)
    assert not (tmp_path / "stack.json").exists()


def test_a_child_that_cannot_start_fails_the_start_with_its_log(tmp_path):
    broken = http_child(tmp_path, "broken", [sys.executable, "-c", "import sys; print('no config here'); sys.exit(3)"])
    supervisor = Supervisor([broken], tmp_path / "stack.json", say=lambda line: None)
    with pytest.raises(StartError, match="(?s)broken exited with 3.*no config here"):
        supervisor.start_all()
    supervisor.stop_all()
