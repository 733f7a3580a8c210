# Two commands do all the set-up on a fresh machine:
#   make book   build the whole book (executes every chapter at the tiny size)
#   make test   run the whole test suite
# and `make lab` opens the chapters in JupyterLab.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Where no NVIDIA GPU is present, install the small CPU build of torch first; with a GPU, pip picks CUDA.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_CPU ?= torch==2.13.0

.PHONY: install book test test-fast lab exercises chapter-cells clean
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q "$(TORCH_CPU)"
endif
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "torchscale==0.3.0"
	touch $(STAMP)

book: $(STAMP) exercises
	LABKIT_STATIC=1 $(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

# The whole suite: labkit units, reference cross-checks, exercises, every notebook (nbval, network blocked),
# and the built book rendered in a headless browser.
test: $(STAMP)
	$(PY) -m pytest tests notebooks --nbval-lax -p tests.offline.plugin -v --durations=25

# Everything but the notebook runs and the book (a few minutes).
test-fast: $(STAMP)
	$(PY) -m pytest tests -v -m "not slow" -p tests.offline.plugin

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# The learner copies beside the chapters: notebooks/NN_name_exercises.ipynb (ignored by git), solutions as stubs.
# Check yours with `.venv/bin/labkit check notebooks/NN_name_exercises.ipynb`.
exercises: $(STAMP)
	for nb in notebooks/[0-9][0-9]_*.ipynb; do case $$nb in *_exercises.ipynb) ;; *) $(VENV)/bin/labkit strip $$nb ;; esac; done

# Every chapter's generated cells: the first one (the Colab set-up, from labkit.notebook.colab_cell() and
# _config.yml's URL) and the line under its Exercises heading that links the learner copy.
chapter-cells: $(STAMP)
	$(PY) -c "import labkit.notebook as n; print(*n.update_chapter_cells() or ['no change'], sep='\n')"

clean:
	rm -rf _build .pytest_cache
