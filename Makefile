# Two entry points for a fresh machine: `make demo` (main job on built-in data) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml constraints.txt
	$(VPY) -m pip install -q --upgrade "pip>=23"
	$(VPY) -m pip install -q -c constraints.txt -e ".[test,export]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/gppf pretrain --out runs/demo

test: $(STAMP)
	$(VPY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/gppf bench lego --json
	$(VENV)/bin/gppf bench simt --json

clean:
	rm -rf $(VENV) runs build src/*.egg-info
