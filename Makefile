# streamprune: `make demo` installs into .venv and runs the offline demo; `make test` runs the suite;
# `make bench` runs every benchmark and writes bench/results/ (about 20 minutes on 2 cores);
# `make bench-device`, on a GPU machine, runs the 7B device scripts with that machine's python3
# (torch and transformers installed, no PyAV needed) and writes their tables to $OUT or out/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Servers the tests start for real: an MQTT broker, a GStreamer RTSP server and a headless
# browser for the web page (Debian packages).
APT_PKGS := mosquitto mosquitto-clients python3-gi gir1.2-gst-rtsp-server-1.0 \
	gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly chromium

.PHONY: demo test bench bench-device install system-deps clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 -c constraints.txt
	$(PIP) install -q -e '.[test]' -c constraints.txt
	touch $@

install: $(VENV)/.installed

system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

demo: install
	$(VENV)/bin/streamprune demo

test: system-deps install
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.run_all

bench-device:
	mkdir -p $${OUT:-out}
	PYTHONUNBUFFERED=1 $(PYTHON) -m bench.ingest_device | tee $${OUT:-out}/ingest_device.md
	PYTHONUNBUFFERED=1 $(PYTHON) -m bench.prompt_cache_device | tee $${OUT:-out}/prompt_cache_device.md

clean:
	rm -rf $(VENV) out .pytest_cache
