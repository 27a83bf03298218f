"""scripts/kernel_fingerprint.py: a line that two machines can compare, the same on every run on one machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fingerprint(*options, **env) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "scripts/kernel_fingerprint.py"), "--steps", "3", "--no-probes", *options],
                          capture_output=True, text=True, cwd=ROOT,   # kernel settings only as the test gives them
                          env={**{k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")},
                               "HF_HUB_OFFLINE": "1", **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_same_machine_and_kernels_give_the_same_fingerprint_and_other_kernels_are_named():
    first, second = _fingerprint(), _fingerprint()
    assert first["weights_sha256"] == second["weights_sha256"] and first["last_loss"] == second["last_loss"]
    assert len(first["weights_sha256"]) == 64 and first["ATEN_CPU_CAPABILITY"] is None
    pinned = _fingerprint(ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE")
    assert (pinned["capability"], pinned["ATEN_CPU_CAPABILITY"], pinned["MKL_CBWR"]) == ("DEFAULT", "default", "COMPATIBLE")


def test_portable_sets_its_kernels_itself_and_gives_the_same_line_on_every_run():
    portable, default = _fingerprint("--portable"), _fingerprint()
    assert (portable["ATEN_CPU_CAPABILITY"], portable["MKL_CBWR"], portable["onednn"], portable["threads"]) == ("default", "COMPATIBLE", False, 2)
    assert portable["weights_sha256"] == _fingerprint("--portable")["weights_sha256"]
    assert default["onednn"] is True
