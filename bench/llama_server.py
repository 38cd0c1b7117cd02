"""llama-cpp-python's own OpenAI-compatible server on the same GGUF and threads as the CPU model:
the baseline the CPU stack is compared with."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterator

from tools.launcher.ports import free_ports
from tools.launcher.probes import http_ready, wait_ready
from tools.launcher.process import spawn, stop
from cloudach.paths import resolve_path

CPU_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "triton" / "cpu" / "tensorrt_llm" / "config.pbtxt"


def _gguf() -> str:
    """The GGUF the CPU model's Triton configuration names."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(CPU_CONFIG.read_text(), model_config_pb2.ModelConfig())
    return resolve_path(config.parameters["gguf_path"].string_value)


@contextlib.contextmanager
def llama_server() -> Iterator[tuple[str, int]]:
    """Yields (base URL, pid) of a running `python -m llama_cpp.server`."""
    (port,) = free_ports(1)
    threads = str(os.cpu_count() or 1)
    log = pathlib.Path(tempfile.mkdtemp(prefix="llama-server-")) / "llama_cpp.server.log"
    process = spawn([sys.executable, "-m", "llama_cpp.server", "--model", _gguf(), "--model_alias", "smollm2",
                     "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", threads,
                     "--n_threads_batch", threads,
                     # queue concurrent requests, as our stack does, instead of interrupting the running one
                     "--interrupt_requests", "False"], log)
    try:
        wait_ready(lambda: http_ready(f"http://127.0.0.1:{port}/v1/models"), "llama_cpp.server", 120, process)
        yield f"http://127.0.0.1:{port}/v1", process.pid
    finally:
        stop(process, 10)


if __name__ == "__main__":
    with llama_server() as (url, pid):
        print(json.dumps({"url": url, "pid": pid}))
