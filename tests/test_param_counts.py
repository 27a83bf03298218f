"""Trainable parameters on ViT-B/16 (head excluded) against the method table of the spec."""
import pytest
import timm

from moppa_nb import apply_peft, count_trainable

# exact counts and how they arise (C = 768, 12 blocks, 12 heads); published values in the comments
EXPECTED = {
    "linear": 0,
    "full": 85_798_656,                                                   # 85.8M
    "bitfit": 12 * (2304 + 768 + 3072 + 768 + 2 * 768) + 768 + 768,       # 102,912 (0.10M)
    "vpt": 12 * 50 * 768,                                                 # 460,800, deep, 50 tokens (0.53M)
    "adapter": 12 * (768 * 8 + 8 + 8 * 768 + 768),                        # 156,768 (0.16M)
    "adaptformer": 12 * (768 * 8 + 8 + 8 * 768 + 768),                    # 156,768 (0.16M)
    "lora": 12 * 2 * 2 * 8 * 768,                                         # 294,912 (0.29M)
    "ssf": 2 * (768 + 12 * (768 + 2304 + 768 + 768 + 3072 + 768) + 768),  # 205,824 (0.21M as V-PETL Bench; the SSF paper prints 0.24M)
    "fact": 2 * 16 * 768 + 144 * 16 ** 2,                                 # 61,440, TT rank 16 on 12 slices per block
    "nola": 12 * 2 * 2 * 1024,                                            # 49,152 (about 0.05M)
    "coeff": 12 * 12 * 12,                                                # 1,728
    "moppa": 9_936,                                                       # reference form
    "rlrr": 12 * (3 * 768 + 3 * 768 + (768 + 2 * 3072) + (3072 + 2 * 768)),   # 193,536: value, proj, fc1, fc2 (in + 2 out)
    "dora": 12 * 2 * (8 * (768 + 768) + 768),                            # 313,344: LoRA rank 8 on Q, V + magnitudes
    "bi_adapter": 12 * 2 * 768 * 32,                                      # 589,824, bottleneck 32, no biases
    "bi_lora": 12 * 2 * 2 * 768 * 32,                                     # 1,179,648, rank 32 on Q and V
    "snell": 12 * 8 * (4 * (768 + 768) + 2 * (768 + 3072)) + 768,          # 1,327,872: SNELL-8 on all six maps, class token
}
VARIANTS = {
    "fact-tt-attention": ({"fact": {"targets": "attention"}}, 2 * 16 * 768 + 48 * 16 ** 2),       # 36,864 (0.04M)
    "fact-tk": ({"fact": {"variant": "tk"}}, 2 * 32 * 768 + 32 ** 3 + 144 * 32),                   # 86,528 (0.07M)
    "vpt-shallow": ({"vpt": {"deep": False}}, 50 * 768),
    "moppa+ssf": (["moppa", "ssf"], 9_936 + 205_824),
    "moppa-both": ({"moppa": {"placement": "both"}}, 3 * 14 * 14 * 12 + 24 * (3 * 64 + 3 * 12 + 12)),   # 12,816
    "moppa-uniform": ({"moppa": {"router": "uniform"}}, 3 * 14 * 14 * 12 + 12 * 3 * 64),   # 9,360: no router logits, temperatures
    "fact+coeff": (["fact", "coeff"], 61_440 + 1_728),
    "moppa+rlrr+ssf": (["moppa", "rlrr", "ssf"], 9_936 + 193_536 + 205_824),
    "ssf-moppa-sites": ({"ssf": {"targets": ["patch_embed", "norm2", "final_norm"]}}, 2 * 768 * (1 + 12 + 1)),   # 21,504
    "moppa+rlrr+ssf-public": ({"moppa": {}, "rlrr": {}, "ssf": {"targets": ["patch_embed", "norm2", "final_norm"]}},
                              9_936 + 193_536 + 21_504),
    "dora+coeff": (["dora", "coeff"], 313_344 + 1_728),
    "coeff-identity": ({"coeff": {"parameterisation": "identity"}}, 1_728),
    "coeff-random": ({"coeff": {"parameterisation": "random"}}, 1_728),
    "snell-32": ({"snell": {"rank": 32}}, 12 * 32 * (4 * (768 + 768) + 2 * (768 + 3072)) + 768),   # 5,309,184: the released VTAB-1K rank
    "snell+coeff": (["snell", "coeff"], 1_327_872 + 1_728),
}


def vit_b(device: str = "meta"):
    """ViT-B/16 with random weights; on the meta device only the shapes exist (no memory, no init)."""
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100, device=device)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_count_on_vit_b(name):
    count = count_trainable(apply_peft(vit_b(), name))
    print(f"{name:12s} {count:>12,}")
    assert count == EXPECTED[name]


@pytest.mark.parametrize("methods, expected", list(VARIANTS.values()), ids=list(VARIANTS))
def test_count_of_variants_and_compositions(methods, expected):
    count = count_trainable(apply_peft(vit_b(), methods))
    print(f"{methods} {count:,}")
    assert count == expected


def test_meta_device_counts_are_the_real_models():
    """One real CPU ViT-B, to show the meta-device counts above are those of an ordinary model."""
    model = apply_peft(vit_b("cpu"), ["lora", "coeff", "ssf"])
    assert count_trainable(model) == EXPECTED["lora"] + EXPECTED["coeff"] + EXPECTED["ssf"]
    assert count_trainable(model, exclude_head=False) == count_trainable(model) + 768 * 100 + 100


def test_paper_profile_vpt_deep_counts_per_task():
    """The paper profile's VPT-Deep prompt lengths per task (a public config, see params.yaml): 12 x 768 x n per task, mean
    0.68M over the 19 tasks, not the published 0.53M, whose per-task lengths no public file gives (README says so)."""
    from pathlib import Path
    from moppa_nb.settings import experiment_settings, load_params, peft_spec
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    experiment = experiment_settings(params, "paper", "vtab")
    counts = {task: count_trainable(apply_peft(vit_b(), peft_spec(experiment, "vpt", task))) for task in experiment["tasks"]}
    assert counts["dmlab"] == 12 * 100 * 768 and counts["sun397"] == 12 * 5 * 768      # the official demo's final runs
    assert round(sum(counts.values()) / len(counts) / 1e6, 2) == 0.68
    shallow = count_trainable(apply_peft(vit_b(), peft_spec(experiment, "vpt[shallow]", "dmlab")))
    assert shallow == 50 * 768


def test_packaged_table_counts_agree_with_ours_where_the_configuration_is_fixed():
    """The packaged VTAB-1K table's params (head excluded) for methods whose configuration is the same on every task."""
    from moppa_nb.report import published_vtab
    published = published_vtab().drop_duplicates("registry_key").set_index("registry_key")["params_m"]
    for method in ("linear", "bitfit", "adapter", "adaptformer", "lora", "ssf"):
        assert published[method] == round(EXPECTED[method] / 1e6, 2), method
    from moppa_nb.datasets import VTAB_CLASSES             # the 19 tasks' class counts, as the dataset builder uses them
    head = sum((768 + 1) * classes for classes in VTAB_CLASSES.values()) / len(VTAB_CLASSES)
    assert len(VTAB_CLASSES) == 19 and round(head / 1e6, 2) == 0.04    # what VPT's table prints for Linear: the head
