"""The pipeline's papermill stages start their kernel over IPC (moppa_nb.papermill_engine): no ipykernel warning about
unencrypted TCP, and no socket file left behind."""
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).parent.parent
TCP_WARNING = "Kernel is running over TCP without encryption"


def papermill_commands() -> dict[str, list[str]]:
    "dvc.yaml's papermill commands by stage, split into words."
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = {name: (stage.get("do") or stage)["cmd"].replace("'", "").split() for name, stage in stages.items()}
    return {name: command[command.index("papermill"):] for name, command in commands.items() if "papermill" in command}


def stage_engine() -> str:
    "The papermill engine every papermill stage of dvc.yaml names (`--engine NAME`)."
    engines = {name: command[command.index("--engine") + 1] if "--engine" in command else None
               for name, command in papermill_commands().items()}
    assert engines and None not in engines.values(), f"papermill stages without --engine: {engines}"
    assert len(set(engines.values())) == 1, engines
    return next(iter(engines.values()))


def test_every_papermill_stage_runs_its_kernel_with_the_ipc_engine():
    assert set(papermill_commands()) == {"train", "report"}
    assert stage_engine() == "ipc"


def run_probe(tmp_path: Path, *engine: str) -> tuple[str, str, list[str]]:
    "Run a notebook that reports its kernel's transport through papermill; its output, papermill's stderr and the runtime directory afterwards."
    probe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import json\nfrom ipykernel.connect import get_connection_file\nprint(json.load(open(get_connection_file()))['transport'])")])
    probe.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(probe, tmp_path / "probe.ipynb")
    with tempfile.TemporaryDirectory(prefix="rt") as runtime:          # short: a socket's path has at most 107 bytes
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home()), "JUPYTER_RUNTIME_DIR": runtime}
        done = subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", *engine, "probe.ipynb", "out.ipynb"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        left_behind = sorted(p.name for p in Path(runtime).iterdir())
    assert done.returncode == 0, done.stderr[-3000:]
    transport = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].outputs[0].text.strip()
    return transport, done.stderr, left_behind


def test_the_stages_engine_starts_the_kernel_over_ipc_without_the_tcp_warning_and_cleans_up(tmp_path):
    transport, stderr, left_behind = run_probe(tmp_path, "--engine", stage_engine())
    assert transport == "ipc" and TCP_WARNING not in stderr, stderr
    assert left_behind == [], f"sockets or connection files left in the runtime directory: {left_behind}"
    assert not list(tmp_path.glob("kernel-ipc*")), "IPC sockets written to the working directory"


def test_papermill_default_engine_shows_the_warning_the_ipc_engine_removes(tmp_path):
    """The control: without `--engine`, ipykernel prints the warning in these words (if it rewords it, the test above
    would pass whatever the transport; this one then fails)."""
    transport, stderr, _ = run_probe(tmp_path)
    assert transport == "tcp" and TCP_WARNING in stderr
