"""tritonserver's command line, shared by the launcher (tools.launcher.triton) and the Triton
images' entrypoint (tools.launcher.serve_triton): standard library only, so the GPU image, which
carries none of our dependencies, can run it."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

#: Triton's gRPC server, by gRPC's default, answers a client's third ping "without data" (one
#: that comes while the server has sent nothing since the last) with GOAWAY too_many_pings and
#: closes the connection: every stream on it ends "Stream removed (Socket closed)". A client's
#: BDP pings on a connection shared by many streams can trip that. Only inference_svc (and our
#: benchmarks) talk to Triton, so its pings are always welcome.
PING_POLICY = ("--grpc-keepalive-permit-without-calls=1", "--grpc-http2-max-ping-strikes=0")


def trace_args(otlp_traces_url: str, rate: int = 1) -> list[str]:
    """Triton's OpenTelemetry tracing (OTLP over HTTP): its spans join the trace whose traceparent
    inference_svc sends with each stream. Empty url: tracing off."""
    if not otlp_traces_url:
        return []
    return ["--trace-config", "mode=opentelemetry", "--trace-config", f"opentelemetry,url={otlp_traces_url}",
            "--trace-config", f"rate={rate}", "--trace-config", "level=TIMESTAMPS"]


def triton_argv(tritonserver: pathlib.Path | str, backend_directory: pathlib.Path | str,
                model_repository: pathlib.Path | str, address: str, ports: Sequence[int],
                extra_args: Sequence[str] = (), gpu_metrics: bool = False, exit_timeout_s: int = 10) -> list[str]:
    """tritonserver's command line, as the launcher runs it and as the Triton images do
    (tools/launcher/serve_triton.py): one function, so they cannot drift apart."""
    http_port, grpc_port, metrics_port = ports
    return [
        str(tritonserver),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_directory}",
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={address}",
        f"--metrics-port={metrics_port}",
        f"--allow-gpu-metrics={'true' if gpu_metrics else 'false'}",
        # Its CPU metrics (nv_cpu_*: nothing here reads them) off: tritonserver 2.51 died of SIGSEGV
        # a few seconds after start, twice today, in the same frames of a thread of its own, the
        # metrics collector by its timing (suspected, not proven; tests restart it either way).
        "--allow-cpu-metrics=false",
        f"--exit-timeout-secs={exit_timeout_s}",  # how long in-flight streams may finish after SIGTERM
        *PING_POLICY,
        *extra_args,
    ]
