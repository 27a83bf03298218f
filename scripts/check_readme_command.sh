#!/usr/bin/env bash
# README command 1, run literally as a new user would: in a fresh clone, in a shell with the system PATH (no virtualenv
# activated), on the `smoke` profile (params.yaml) so it takes minutes. Fails if the command fails or if the pipeline
# leaves git or dvc unclean beyond the smoke profile's own results. Run by .ci/run before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
command=$(grep -m1 -E '^bash scripts/setup\.sh' README.md) || { echo "README has no 'bash scripts/setup.sh ...' command" >&2; exit 1; }
clone=$(mktemp -d)/moppa-nb
trap 'rm -rf "$(dirname "$clone")"' EXIT
git clone -q . "$clone"
cd "$clone"
sed -i 's/^profile: default$/profile: smoke/' params.yaml
echo "README command 1 in a fresh clone, system PATH, smoke profile: $command"
started=$(date +%s)
env -i HOME="$HOME" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 ${MOPPA_NB_CACHE:+MOPPA_NB_CACHE=$MOPPA_NB_CACHE} \
  HF_HUB_OFFLINE=1 bash -c "$command"
echo "README command 1 succeeded in $(( $(date +%s) - started )) s"
test -s reports/smoke/results.md || { echo "the smoke run wrote no reports/smoke/results.md" >&2; exit 1; }
status=$(.venv/bin/dvc status -q >/dev/null 2>&1 && echo clean || .venv/bin/dvc status)
[ "$status" = clean ] || { echo "dvc status is not clean after dvc repro:" >&2; echo "$status" >&2; exit 1; }
echo "dvc status: clean"
