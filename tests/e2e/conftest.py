"""The whole stack as real processes, started the way `make run` starts it (`cloudach up`), on free
ports and a temporary state directory, for the streaming guide's examples to run against."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from cloudach import defaults as d
from tools.launcher.ports import free_ports
from tools.launcher.process import alive

REPO = pathlib.Path(__file__).resolve().parents[2]
GUIDE = pathlib.Path(__file__).parent / "guide"
NODE = pathlib.Path(__file__).parent / "node"
MODEL = "smollm2-135m-instruct"
STARTUP_TIMEOUT_S = 300


@dataclass
class Output:
    """A child's stdout, read as it comes by a thread."""

    process: subprocess.Popen
    text: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def drained(self, timeout_s: float = 10) -> str:
        """All the child printed, once its stdout has closed (it has exited)."""
        self._reader.join(timeout_s)
        assert not self._reader.is_alive(), "the child's stdout is still open"
        return self.text

    def _pump(self) -> None:
        while piece := os.read(self.process.stdout.fileno(), 4096):
            with self._lock:
                self.text += piece.decode(errors="replace")

    def wait_for(self, needle: str, timeout_s: float, start: int = 0) -> int:
        """Waits until needle appears after offset start; returns the offset just past it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                found = self.text.find(needle, start)
            if found >= 0:
                return found + len(needle)
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the pump drain what is left
                if needle in self.text[start:]:
                    return self.text.index(needle, start) + len(needle)
                raise AssertionError(f"exited ({self.process.returncode}) before {needle!r}:\n{self.text[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} after {timeout_s}s:\n{self.text[-3000:]}")


@dataclass
class Stack:
    process: subprocess.Popen
    output: Output
    state_dir: pathlib.Path
    port: int
    auth_port: int
    billing_port: int
    inference_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def dev_key(self) -> str:
        return (self.state_dir / "dev-api-key").read_text().strip()

    def services(self) -> dict[str, dict]:
        state = json.loads((self.state_dir / "stack.json").read_text())
        return {s["name"]: s for s in state["services"]}

    def env(self, api_key: str | None = None) -> dict[str, str]:
        """What a user of the guide sets: the base URL, the key, the model."""
        return {**os.environ, "CLOUDACH_BASE_URL": self.base_url, "CLOUDACH_API_KEY": api_key or self.dev_key,
                "CLOUDACH_MODEL": MODEL, "PYTHONUNBUFFERED": "1"}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tools", *args], capture_output=True, text=True, timeout=60, cwd=self.state_dir.parent,
            env={**os.environ, "CLOUDACH_AUTH_TARGET": f"127.0.0.1:{self.auth_port}",
                 "CLOUDACH_BILLING_TARGET": f"127.0.0.1:{self.billing_port}"},
        )

    def ledger(self, columns: str, where: str = "1 = 1", *params) -> list[tuple]:
        """Rows of billing_svc's usage records, read from its SQLite database."""
        path = self.state_dir / "data" / d.BILLING_DATABASE
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute(f"SELECT {columns} FROM usage_records WHERE {where}", params).fetchall()

    def await_ledger(self, why: str, columns: str, where: str, *params, timeout_s: float = 30) -> list[tuple]:
        """The ledger's rows once there are any (the edge delivers usage in the background);
        fails with why past timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not (rows := self.ledger(columns, where, *params)):
            assert time.monotonic() < deadline, why
            time.sleep(0.5)
        return rows

    def create_key(self, org: str, *limits: str) -> str:
        made = self.cli("keys", "create", "--org", org, *limits)
        assert made.returncode == 0, made.stderr
        return next(word for word in made.stdout.split() if word.startswith("ck-"))


def launch_stack(tmp_path_factory, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
    """`cloudach up` on free ports and a fresh state directory, env added to its environment and
    args to its command line; yields the Stack, then stops it and checks it stopped cleanly."""
    state_dir = tmp_path_factory.mktemp("e2e") / ".cloudach"
    port, inference_port, auth_port, billing_port, *metrics = free_ports(8)
    metrics_ports = {f"CLOUDACH_{name}_METRICS_PORT": str(p)
                     for name, p in zip(("INFERENCE", "AUTH", "BILLING", "EDGE"), metrics)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tools", "up", "--state-dir", str(state_dir), "--port", str(port),
         "--inference-port", str(inference_port), "--auth-port", str(auth_port), "--billing-port", str(billing_port),
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **metrics_ports, **(env or {})},
    )
    output = Output(process)
    running = Stack(process, output, state_dir, port, auth_port, billing_port, inference_port)
    try:
        output.wait_for("Cloudach is up.", STARTUP_TIMEOUT_S)
        yield running
    finally:
        pids = [s["pid"] for s in running.services().values()] if (state_dir / "stack.json").exists() else []
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, output.text[-3000:]
    assert "stopped." in output.text
    assert pids and not [pid for pid in pids if alive(pid)], "the launcher left processes behind"
    assert not (state_dir / "stack.json").exists()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    yield from launch_stack(tmp_path_factory)


def npm_ci(folder: pathlib.Path) -> pathlib.Path:
    """`npm ci` in folder unless its node_modules already holds what package-lock.json pins."""
    lock = hashlib.sha256((folder / "package-lock.json").read_bytes()).hexdigest()
    stamp = folder / "node_modules" / ".cloudach-lock"
    if not stamp.exists() or stamp.read_text() != lock:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=folder, timeout=300,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        stamp.write_text(lock)
    return folder / "node_modules"


@pytest.fixture(scope="session")
def node_modules() -> pathlib.Path:
    """The Node examples' one dependency, the openai npm package, as package-lock.json pins it."""
    return npm_ci(NODE)
