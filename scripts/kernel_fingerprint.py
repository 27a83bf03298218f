"""Print, as one JSON line, what this machine's CPU kernels compute: a fingerprint to compare across machines.

    python scripts/kernel_fingerprint.py [--steps 40] [--no-probes]
    ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE python scripts/kernel_fingerprint.py

Two computations the pipeline's numbers rest on, from fixed inputs: `steps` AdamW steps of the default profile's ViT
(random init, seed 0, random images and labels; the SHA-256 of the final weights, the last loss to 10 digits) and the
closed-form linear probe of raw pixels on each default task (test %, after `dvc repro prepare`). Two machines whose lines
agree compute these bit for bit; lines that differ show what floating point alone changes. The settings that select the
kernels (torch's `ATEN_CPU_CAPABILITY`, MKL's `MKL_CBWR`) and the thread count are part of the line: compare like with like.
"""
import argparse
import hashlib
import json
import os
import platform
import time

import torch


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
    args = parser.parse_args()
    line = {"cpu": cpu_model(), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"), "MKL_CBWR": os.environ.get("MKL_CBWR"),
            "threads": torch.get_num_threads(), **training_fingerprint(args.steps)}
    if not args.no_probes: line["raw_pixel_probe"] = probe_fingerprint(args.params)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
