"""The Triton images' entrypoint (deploy/images/): tritonserver with the launcher's own command
line (tools.launcher.triton.triton_argv), listening on every address, in place of this process.

    python -m tools.launcher.serve_triton --model-repository /opt/cloudach/models          # CPU image
    python -m tools.launcher.serve_triton --tritonserver /opt/tritonserver/bin/tritonserver \\
        --backend-directory /opt/tritonserver/backends --gpu-metrics --model-repository ...   # GPU image
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tools.launcher.triton_args import trace_args, triton_argv

#: the ports Triton's images and Kubernetes Services use (Triton's own defaults)
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
#: after SIGTERM, streams may finish for as long as a request may run (the launcher's Triton: 10 s)
EXIT_TIMEOUT_S = 600


def argv(args: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="serve_triton")
    parser.add_argument("--model-repository", required=True)
    parser.add_argument("--tritonserver", help="default: the one nvidia-pytriton ships (the CPU image)")
    parser.add_argument("--backend-directory")
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--gpu-metrics", action="store_true")
    parser.add_argument("--trace-url", default=os.environ.get("CLOUDACH_TRITON_TRACE_URL", ""))
    options = parser.parse_args(args)
    home = None
    if options.tritonserver is None:
        from tools.launcher.triton import triton_home  # the CPU image: nvidia-pytriton's tritonserver

        home = triton_home()
    tritonserver = options.tritonserver or home / "bin" / "tritonserver"
    backends = options.backend_directory or (home / "backends" if home else "/opt/tritonserver/backends")
    return triton_argv(tritonserver, backends, options.model_repository, options.address,
                       (HTTP_PORT, GRPC_PORT, METRICS_PORT), trace_args(options.trace_url), options.gpu_metrics,
                       EXIT_TIMEOUT_S)


def main() -> None:
    command = argv(sys.argv[1:])
    # The Python backend's stub finds this interpreter (and our packages) on PATH.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
