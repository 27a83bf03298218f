import sys, json, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import numpy as np, torch
from cands import CANDIDATES
from moppa_nb.mini_vtab import drawn_splits, task_rng
from moppa_nb.data import write_vtab_task
from moppa_nb.settings import load_params
from moppa_nb.sources import load_task
from moppa_nb.pretrain import load_backbone, vit_features, pixel_features, linear_probe_accuracy
from PIL import Image
torch.set_num_threads(1)
root = sys.argv[2] + "/data"      # python screen.py NAMES OUT: probes of each candidate, and a grid of its images
params = load_params(); profile = params["profiles"]["default"]
bb = load_backbone("artifacts/default/backbones/default"); feats = vit_features(bb)
for name in sys.argv[1].split(","):
    draw, k = CANDIDATES[name]
    splits = drawn_splits(draw, task_rng(name, 0), 500)
    write_vtab_task(root, name, splits, num_classes=k, info={"group": "Specialized"})
    grid = np.concatenate([np.concatenate(list(splits["train800"][0][r*12:(r+1)*12]), 1) for r in range(6)], 0)
    Image.fromarray(grid).resize((grid.shape[1]*3, grid.shape[0]*3), Image.NEAREST).save(f"{sys.argv[2]}/{name}.png")
    prof = profile | {"data": profile["data"] | {"root": root}}
    t = load_task(prof, name, splits=("train800", "val200", "test"))
    r = {fn: round(100 * linear_probe_accuracy(f, t)["test_acc"], 1) for fn, f in (("pretrained", feats), ("pixels", pixel_features))}
    print(name, r, "labels", np.bincount(splits["train800"][1]).tolist(), flush=True)
