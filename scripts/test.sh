#!/usr/bin/env bash
# The README's test command: install, then the whole suite (unit tests and the end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest tests -q -p no:cacheprovider --durations=15
