# Two-command quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sureid-installed

.PHONY: demo test test-slow lint install clean

# BoxMOT (the tracking extra) pulls opencv-python, whose cv2 needs the system's libGL, absent on
# bare servers and CI images; opencv-python-headless of the same version is the same cv2 without
# the GUI windows, which SUREID never opens: the install swaps them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,viz,faiss,onnx,tracking]"
	v=$$($(PY) -m pip show opencv-python 2>/dev/null | sed -n 's/^Version: //p'); \
	if [ -n "$$v" ]; then $(PY) -m pip uninstall -y -q opencv-python && \
	$(PY) -m pip install -q "opencv-python-headless==$$v"; fi
	$(PY) -c "import cv2, boxmot"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sureid demo

# The fast tier; `make test-slow` runs the rest (demo runs, subprocesses, longer trainings,
# the research scripts' smoke tests). .ci/run runs both.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check sureid tests examples benchmarks research tools
	$(VENV)/bin/ruff format --check sureid tests examples benchmarks research tools

clean:
	rm -rf $(VENV) build *.egg-info
