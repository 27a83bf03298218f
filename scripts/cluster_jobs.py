"""Print the training jobs of a profile, one shell command per (experiment, method), for a cluster's job array.

The cluster route (README: Reproduction): in one clone on a filesystem every node sees, with `profile: <name>` in
params.yaml, run `.venv/bin/dvc repro prepare backbone` once; then run each printed command as its own job (any order,
any number at once: each writes only its own `runs/<profile>/<experiment>/<method>/` and a lock refuses a second writer);
then `.venv/bin/dvc repro` on one node reads every finished run back from its folder (nothing trains again: a run is
read back when its settings, data, backbone and code are those it was trained under), writes the metrics, `dvc.lock`
and the report. A job that was stopped resumes from its last checkpoint when run again.

    .venv/bin/python scripts/cluster_jobs.py --profile paper > jobs.txt      # e.g. Slurm: sbatch --array=1-$(wc -l < jobs.txt)
    sed -n "${SLURM_ARRAY_TASK_ID}p" jobs.txt | bash                         # ... in each array task
"""
import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from moppa_nb.experiment import check_profile, experiment_methods, experiment_settings, load_params  # noqa: E402


def jobs(params: dict, profile: str, experiments: list[str] | None = None) -> list[str]:
    "One command per (experiment, method) of `profile`, run from the repository root; names are checked, and quoted."
    check_profile(params, profile)                       # profile, experiment and group names: identifiers only
    names = experiments or list(params["experiments"])
    unknown = [name for name in names if name not in params["experiments"]]
    if unknown: raise SystemExit(f"unknown experiment(s) {unknown}; params.yaml has {list(params['experiments'])}")
    commands = []
    for name in names:
        for method in experiment_methods(experiment_settings(params, profile, name)):
            output = f"runs/{profile}/{name}/{method}"
            commands.append(f"cd {shlex.quote(str(ROOT))} && pipeline/env python -m moppa_nb.experiment train {shlex.quote(method)} "
                            f"--experiment {shlex.quote(name)} --profile {shlex.quote(profile)} --output {shlex.quote(output)}")
    return commands


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="profile (default: params.yaml's `profile`)")
    parser.add_argument("--experiment", nargs="*", default=None, help="only these experiments")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    print("\n".join(jobs(params, args.profile or params["profile"], args.experiment)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
