PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
JOBS ?= 2

.PHONY: install install-test demo test clean services gpu-wheels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU wheel, so nothing else resolves a CUDA build
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m vidloom.demo

test: install-test services
	$(PY) -m pytest -n $(JOBS) -q

# what the tests start themselves, from Debian's packages: Chromium for the serve web page's
# browser test (driven by Playwright through its executable path) and PostgreSQL for the shared
# job store (a throwaway server on loopback)
services:
	@command -v chromium >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -q && apt-get install -y -q chromium postgresql)

# Wheels for a GPU machine without network (Python 3.12, x86_64 Linux, torch and CUDA
# preinstalled): everything the package, the CUDA tests, benchmarks/gpu.py and benchmarks/serve.py
# import, besides torch and its own requirements. Pinned to the versions the CPU suite passed
# with; --no-deps, so torch and the nvidia-* wheels are never pulled. The list is closed under
# requirements (for Python 3.12 on Linux): a new dependency is added here by hand. Left out to
# stay under the 64 MiB a GPU machine is handed: hf-xet (hub downloads only), typer, rich,
# markdown-it-py, mdurl, shellingham (the hf and transformers command lines only), av
# (tests/test_cli only) and imageio-ffmpeg's 66 MB ffmpeg binary: its Python package is built from
# the sdist, and gpu_check.sh uses the machine's ffmpeg or, for the serve benchmark, a stand-in.
# kernels stays (transformers refuses to load a model without it), pygments too (pytest imports it).
# benchmarks/gpu_check.sh installs from this folder what the machine lacks (or has older).
GPU_WHEEL_DIR := .whl
GPU_WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform linux_x86_64
GPU_WHEELS := \
	numpy==2.4.6 safetensors==0.8.0 transformers==5.25.0 tokenizers==0.23.3 sentencepiece==0.2.3 \
	ftfy==6.3.1 wcwidth==0.9.5 imageio==2.38.2 pillow==13.0.0 tqdm==4.70.1 \
	huggingface-hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 \
	pyyaml==6.0.4 regex==2026.12.2 packaging==26.4 click==8.5.1 kernels==0.19.1 tomlkit==0.15.3 pygments==2.21.0 \
	diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 requests==2.34.2 \
	urllib3==2.8.0 charset-normalizer==3.5.3 idna==3.21 certifi==2026.10.19.post1 accelerate==1.16.0 \
	psutil==7.2.2 fastapi==0.165.0 annotated-doc==0.0.7 opentelemetry-api==1.45.3 starlette==1.10.0 \
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	uvicorn==0.55.0 h11==0.16.0 python-multipart==0.0.34 prometheus-client==0.26.0 httpx==0.29.0 \
	httpcore==1.0.9 anyio==4.16.0 sniffio==1.3.1 openai==3.63.0 jiter==0.19.0 \
	pytest==9.2.0 pytest-xdist==3.8.0 execnet==2.1.2 iniconfig==2.3.1 pluggy==1.7.0

gpu-wheels:
	mkdir -p $(GPU_WHEEL_DIR)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--abi cp312 --abi abi3 --abi none $(GPU_WHEEL_PLATFORMS) -d $(GPU_WHEEL_DIR) $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps --no-binary imageio-ffmpeg -w $(GPU_WHEEL_DIR) imageio-ffmpeg==0.8.1
	@echo "$$(ls $(GPU_WHEEL_DIR)/*.whl | wc -l) wheels, $$(du -sh $(GPU_WHEEL_DIR) | cut -f1) in $(GPU_WHEEL_DIR)/"

clean:
	rm -rf $(VENV) build *.egg-info
