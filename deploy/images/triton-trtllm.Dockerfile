# Triton with our TensorRT-LLM model (deploy/triton/trtllm: a Python-backend model around the
# LLM API, PyTorch backend) on NVIDIA's Triton + TensorRT-LLM container, pinned. The checkpoint
# is not in the image: it is mounted at /models/llama3-8b (deploy/k8s/overlays/gpu).
# Build from the repository root: docker build -f deploy/images/triton-trtllm.Dockerfile .
FROM nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3
# caches (PyTorch, TensorRT-LLM, Triton) under a writable HOME: the pod runs as an unnamed user
ENV PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /opt/cloudach
COPY triton_model triton_model
COPY tools tools
COPY cloudach cloudach
COPY deploy/triton/trtllm deploy/triton/trtllm
# The model's own Python dependency beside TensorRT-LLM's (the base image carries numpy and
# TensorRT-LLM, whose pins are kept: --no-deps).
RUN pip install --no-cache-dir --no-deps "llguidance==1.9.1"
ENV PYTHONPATH=/opt/cloudach
USER 1000
EXPOSE 8000 8001 8002
ENTRYPOINT ["python3", "-m", "tools.launcher.serve_triton", "--tritonserver", "/opt/tritonserver/bin/tritonserver", \
            "--backend-directory", "/opt/tritonserver/backends", "--gpu-metrics"]
CMD ["--model-repository", "/opt/cloudach/deploy/triton/trtllm"]
