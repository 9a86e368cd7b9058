#!/usr/bin/env bash
# The README's main command: install, then DeSD pre-training on the bundled real chest CT and its export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
desd_demo "$@"
