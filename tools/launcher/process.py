"""Starting and stopping the launcher's child processes so that none outlives it."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
from collections.abc import Sequence


def _death_signal(sig: int):
    def arm() -> None:
        """Runs in the child before exec: on Linux the kernel sends it sig when the thread that
        started it dies, so a launcher killed with SIGKILL leaves no child behind."""
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    return arm


def spawn(args: Sequence[str], log_path: pathlib.Path, env: dict[str, str] | None = None,
          own_session: bool = False, death_signal: int = signal.SIGTERM) -> subprocess.Popen:
    """Starts args with its output appended to log_path and env added to ours. own_session: its
    own process group (our terminal's Ctrl-C does not reach it; stop() signals the whole group)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=own_session,
            preexec_fn=_death_signal(death_signal),
        )
    process.leads_group = own_session  # its group outlives it if it dies first: see reap_group()
    return process


def reap_group(process: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group a dead (or dying) group leader started: Triton's
    Python-backend stubs outlive a tritonserver that crashed, spinning on their own."""
    if getattr(process, "leads_group", False):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop(process: subprocess.Popen, timeout_s: float = 35) -> None:
    """SIGTERM (our services drain their requests; Triton unloads its models), then after
    timeout_s (at once if 0) SIGKILL to the process, or to its whole group when it leads one
    (Triton's model stubs are in it)."""
    if process.poll() is None and timeout_s > 0:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    if process.poll() is None:
        process.kill()
    reap_group(process)
    process.wait()


def proc_state(pid: int) -> tuple[str, int] | None:
    """A process's state letter and process group, from /proc; None when there is no such process."""
    try:
        state, _, group = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[:3]
        return state, int(group)
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """Whether pid is a running process (a zombie, dead but not yet reaped, is not)."""
    found = None if pid is None else proc_state(pid)
    return found is not None and found[0] != "Z"


def log_tail(path: pathlib.Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
