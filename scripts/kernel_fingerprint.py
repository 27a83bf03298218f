"""Print, as one JSON line, what this machine's CPU kernels compute: a fingerprint to compare across machines.

    python scripts/kernel_fingerprint.py [--steps 40] [--no-probes] [--portable]
    ATEN_CPU_CAPABILITY=avx2 python scripts/kernel_fingerprint.py

Two computations the pipeline's numbers rest on, from fixed inputs: `steps` AdamW steps of the default profile's ViT
(random init, seed 0, random images and labels; the SHA-256 of the final weights, the last loss to 10 digits) and the
closed-form linear probe of raw pixels on each default task (test %, after `dvc repro prepare`). Two machines whose lines
agree compute these bit for bit; lines that differ show what floating point alone changes. The settings that select the
kernels (torch's `ATEN_CPU_CAPABILITY`, MKL's `MKL_CBWR`, oneDNN on or off) and the thread count are part of the line:
compare like with like. `--portable` computes with the kernels least tied to one CPU: torch's unvectorised ones, MKL's
SSE2 code path (conditional numerical reproducibility), oneDNN off (its kernels are compiled for the CPU at hand) and 2
threads, at about 2.5 times the time of a step.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import time

import torch


PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}   # read once, when torch and MKL start
PORTABLE_THREADS = 2


def cpu_model() -> str:
    "The CPU's model name (Linux), else the platform's processor string."
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def training_fingerprint(steps: int = 40, batch_size: int = 32) -> dict:
    "SHA-256 of the default ViT's weights after `steps` AdamW steps from seed 0 on fixed random data, the last loss, ms per step."
    from moppa_nb.pretrain import PretrainConfig, build_backbone
    torch.manual_seed(0)
    model = build_backbone(PretrainConfig().architecture(), num_classes=10)
    images, labels = torch.randn(batch_size, 3, 28, 28), torch.randint(0, 10, (batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    elapsed = time.perf_counter() - start
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.state_dict().values())).hexdigest()
    return {"weights_sha256": digest, "last_loss": f"{loss.item():.10f}", "ms_per_step": round(1000 * elapsed / max(steps, 1), 1)}


def probe_fingerprint(params_file: str = "params.yaml") -> dict:
    "Raw-pixel linear-probe test accuracy (%) per task of the profile (its prepared data must exist)."
    from moppa_nb.pretrain import linear_probe_accuracy, pixel_features
    from moppa_nb.settings import load_params, profile_settings
    from moppa_nb.sources import load_task
    profile = profile_settings(load_params(params_file))
    return {task: round(100 * linear_probe_accuracy(pixel_features, load_task(profile, task, splits=("train800", "val200", "test")))["test_acc"], 2)
            for task in profile["tasks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="AdamW steps of the training fingerprint")
    parser.add_argument("--no-probes", action="store_true", help="skip the raw-pixel probes (they need `dvc repro prepare`)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--portable", action="store_true", help="the kernels least tied to one CPU (see above)")
    args = parser.parse_args()
    if args.portable:
        if any(os.environ.get(key) != value for key, value in PORTABLE_ENV.items()):     # start again with them set
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PORTABLE_ENV})
        torch.backends.mkldnn.enabled = False
        torch.set_num_threads(PORTABLE_THREADS)
    line = {"cpu": cpu_model(), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"), "MKL_CBWR": os.environ.get("MKL_CBWR"),
            "onednn": torch.backends.mkldnn.enabled, "threads": torch.get_num_threads(), **training_fingerprint(args.steps)}
    if not args.no_probes: line["raw_pixel_probe"] = probe_fingerprint(args.params)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
