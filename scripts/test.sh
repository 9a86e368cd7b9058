#!/usr/bin/env bash
# The README's test command: install, then the whole suite (unit tests and the end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Two pytest-xdist workers (DESD_TEST_WORKERS to change): the end-to-end tests spend much of their time in
# subprocess start-up, spawned pools, sleeps and signals, which a second worker overlaps. tests/conftest.py sends
# out one test module (or the modules that share a prepared fixture) at a time, the longest first.
python -m pytest tests -q -p no:cacheprovider --durations=15 -n "${DESD_TEST_WORKERS:-2}" --dist loadfile
