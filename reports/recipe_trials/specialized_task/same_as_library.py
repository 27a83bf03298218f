"""The chosen candidate (`blood_j`) draws byte for byte the images of `moppa_nb.mini_vtab.blood_cell_image` (seeds 0, 1)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from candidates import blood_j   # noqa: E402
from moppa_nb.mini_vtab import blood_cell_image, drawn_splits, task_rng   # noqa: E402

for seed in (0, 1):
    ours, candidate = drawn_splits(blood_cell_image, task_rng("x", seed), 100), drawn_splits(blood_j, task_rng("x", seed), 100)
    assert all(np.array_equal(ours[s][0], candidate[s][0]) and np.array_equal(ours[s][1], candidate[s][1]) for s in ours)
print("identical")
