#!/usr/bin/env bash
# The test command: install (if needed) into .venv, check the package is exported from the notebooks
# and the notebooks are clean, run the notebook tests, then pytest (its summary line ends the output).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
VENV=${VENV:-.venv}
bash scripts/setup.sh
before=$(git status --porcelain)
"$VENV/bin/nbdev_export"
"$VENV/bin/nbdev_clean"
"$VENV/bin/nbdev_clean" --fname pipeline
after=$(git status --porcelain)
if [ "$before" != "$after" ]; then
  echo "nbdev_export / nbdev_clean changed files: export the notebooks and commit the result:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
"$VENV/bin/nbdev_test" --n_workers 2
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests
