"""The images (deploy/images/) run what the launcher runs: the services as `python -m <service>`
(the Deployments' args: tests/unit/test_deploy_k8s.py), Triton through serve_triton, whose command
line is the launcher's own function, on the model repositories the launcher serves."""

from __future__ import annotations

import json
import pathlib
import re

from tools.launcher import serve_triton
from tools.launcher.triton import CPU_MODEL_REPOSITORY, triton_home
from tools.launcher.triton_args import triton_argv

REPO = pathlib.Path(__file__).resolve().parents[2]
IMAGES = REPO / "deploy" / "images"


def instruction(dockerfile: str, name: str) -> list[str]:
    """The exec form of the Dockerfile's last ENTRYPOINT or CMD (continuation lines joined)."""
    text = (IMAGES / dockerfile).read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name} (\[.*\])\s*$", text, re.MULTILINE)
    assert found, f"{dockerfile} has no exec-form {name}"
    return json.loads(found[-1])


def entrypoint(dockerfile: str) -> list[str]:
    return instruction(dockerfile, "ENTRYPOINT")


def test_the_services_image_runs_a_python_module_as_non_root():
    assert entrypoint("services.Dockerfile") == ["python", "-m"]
    text = (IMAGES / "services.Dockerfile").read_text()
    assert "USER 10001" in text and "-c constraints.txt" in text and "tools.protogen" in text


def test_the_cpu_triton_image_serves_the_launchers_model_repository_with_its_command_line():
    command = [*entrypoint("triton-cpu.Dockerfile"), *instruction("triton-cpu.Dockerfile", "CMD")]
    assert command[:3] == ["python", "-m", "tools.launcher.serve_triton"]
    repository = pathlib.Path(command[command.index("--model-repository") + 1])
    assert repository == pathlib.Path("/opt/cloudach") / CPU_MODEL_REPOSITORY.relative_to(REPO)
    home = triton_home()
    assert serve_triton.argv(command[3:]) == triton_argv(home / "bin" / "tritonserver", home / "backends", repository,
                                                         "0.0.0.0", (8000, 8001, 8002), exit_timeout_s=600)


def test_the_gpu_triton_image_serves_the_trtllm_repository_on_nvidias_pinned_container():
    text = (IMAGES / "triton-trtllm.Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-trtllm-python-py3$", text, re.MULTILINE)
    command = [*entrypoint("triton-trtllm.Dockerfile"), *instruction("triton-trtllm.Dockerfile", "CMD")]
    assert command[:3] == ["python3", "-m", "tools.launcher.serve_triton"]
    argv = serve_triton.argv(command[3:])
    assert argv[0] == "/opt/tritonserver/bin/tritonserver" and "--allow-gpu-metrics=true" in argv
    assert "--model-repository=/opt/cloudach/deploy/triton/trtllm" in argv
    assert (REPO / "deploy" / "triton" / "trtllm" / "tensorrt_llm" / "config.pbtxt").exists()
