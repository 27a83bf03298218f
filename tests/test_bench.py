"""The benchmark's table writer and its handling of the methods params.yaml lists (no ViT-B timing here)."""
import csv
from pathlib import Path

import pytest
import timm
import torch
import yaml

from moppa_nb import apply_peft
from moppa_nb.bench import TABLE_COLUMNS, benchmark_method, split_variant, stored_adapter_kb, write_report

ROOT = Path(__file__).parent.parent
TINY = dict(model_name="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 2}, batch_size=2, warmup=0, repeats=1)


def test_markdown_table_shows_the_stored_size(tmp_path):
    rows = [{"method": "lora", "trainable_params": 294_912, "stored_kb": 1152.0, "float32_kb": 1152.0},
            {"method": "bi_adapter", "trainable_params": 589_824, "stored_kb": 72.1875, "float32_kb": 2304.0}]
    markdown = write_report(rows, tmp_path / "bench.csv", "a caption").read_text()
    header, _, lora, bi_adapter = markdown.strip().splitlines()[-4:]
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
    assert cells(header) == list(TABLE_COLUMNS) and cells(header)[-1] == "stored_kb"
    assert cells(lora)[-1] == "1152.0" and cells(bi_adapter)[-1] == "72.2"
    assert markdown.startswith("# Benchmark\n\n**a caption**")
    saved = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert saved[1]["stored_kb"] == "72.1875" and saved[1]["float32_kb"] == "2304.0"


def test_one_bit_methods_are_stored_at_one_bit_on_vit_b():
    def vit_b(method):
        return apply_peft(timm.create_model("vit_base_patch16_224", pretrained=False, device="meta"), method)
    # weights at 1 bit, plus a float32 mean and std per quantised tensor (Bi-LoRA: Q and V each)
    assert stored_adapter_kb(vit_b("bi_adapter")) == {"stored_kb": (589_824 + 12 * 2 * 64) / 8 / 1024, "float32_kb": 2304.0}
    assert stored_adapter_kb(vit_b("bi_lora"))["stored_kb"] == (1_179_648 + 12 * 2 * 2 * 64) / 8 / 1024


def test_params_bench_methods_are_known_and_include_the_new_ones():
    methods = yaml.safe_load((ROOT / "params.yaml").read_text())["bench"]["methods"]
    assert {"spt", "bi_lora", "bi_adapter"} <= set(methods)
    for spec in methods: split_variant(spec)


def test_bench_runs_spt_and_bi_lora_on_a_tiny_vit():
    spt, bi_lora = (benchmark_method(spec, **TINY) for spec in ("spt", "bi_lora"))
    assert spt["trainable_params"] > 0 and spt["merged_infer_ms_per_image"] > 0       # allocated, mergeable
    assert bi_lora["stored_kb"] < bi_lora["float32_kb"] / 16                          # 1-bit factors


def test_from_params_reads_calls_and_keeps_the_default_without_it(tmp_path):
    from moppa_nb.bench import _arguments
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"bench_interleaved": {"methods": ["linear", "lora"], "interleave": 4, "calls": 3},
                                      "bench": {"methods": ["linear"]}}))
    args = _arguments(["--from-params", str(params), "--params-section", "bench_interleaved", "--device", "cpu"])
    assert (args.methods, args.interleave, args.calls, args.batch_size) == (["linear", "lora"], 4, 3, 4)
    assert _arguments(["--from-params", str(params), "--device", "cpu"]).calls == 1          # no `calls` key: the default


def test_reference_fused_lora_equals_our_lora_at_the_same_factors():
    import torch
    from moppa_nb.bench import build_benchmark_model, default_specs, interleaved_ratios
    from moppa_nb.adapt import count_trainable
    small = dict(model_name="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 2}, batch_size=2)
    ours, images, _ = build_benchmark_model("lora", **small)
    ref, _, ref_step = build_benchmark_model("ref_fused_lora", **small)
    assert count_trainable(ref, exclude_head=True) == count_trainable(ours, exclude_head=True) == 2 * 2 * 2 * 8 * 192
    assert {n for n, p in ref.named_parameters() if p.requires_grad} == {
        *(f"blocks.{i}.attn.qkv.{f}" for i in range(2) for f in "ab"), "head.weight", "head.bias"}
    with torch.no_grad():
        plain, _, _ = build_benchmark_model("linear", **small)
        torch.testing.assert_close(ref.eval()(images), plain.eval()(images))             # B = 0: the plain model at init
        for mine, theirs in zip(ours.blocks, ref.blocks):
            torch.nn.init.normal_(mine.attn.peft_lora.b)
            theirs.attn.qkv.a.copy_(mine.attn.peft_lora.a); theirs.attn.qkv.b.copy_(mine.attn.peft_lora.b)
        torch.testing.assert_close(ref(images), ours.eval()(images), atol=1e-5, rtol=1e-5)
    ref_step()                                                                           # a training step runs
    assert "ref_fused_lora" in default_specs() and split_variant("ref_fused_lora") == ("ref_fused_lora", "")
    rows = interleaved_ratios(["linear", "lora", "ref_fused_lora"], rounds=1, warmup=0, **small)
    assert rows[2]["method"] == "ref_fused_lora" and rows[2]["step_vs_lora"] > 0



def test_compile_variant_runs_the_same_model_compiled():
    """`spec@compile`: the adapted model's calls go through torch.compile; a training step and inference run, and the
    compiled model computes what the eager one does with the same weights."""
    from moppa_nb.bench import benchmark_method, build_benchmark_model
    small = dict(model_name="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 1}, batch_size=2)
    compiled, images, step = build_benchmark_model("lora@compile", **small)
    step()                                                        # compiles forward and backward, trains one step
    eager, _, _ = build_benchmark_model("lora", **small)
    with torch.no_grad():
        eager.load_state_dict(compiled.state_dict())              # the same module keys: compiled in place
        assert torch.allclose(compiled.eval()(images), eager.eval()(images), atol=1e-4)
    row = benchmark_method("lora@compile", warmup=1, repeats=1, **small)
    assert row["method"] == "lora@compile" and row["merged_infer_ms_per_image"] is None and row["trainable_params"] > 0


def test_a_compiled_model_after_another_in_one_process_still_trains_its_adapter():
    """dynamo's cache used to hand a later compiled model an earlier one's graph (LoRA factors got no gradient): each
    `@compile` build starts from a clean cache, and interleaving two compiled models in one process is refused."""
    from moppa_nb.bench import build_benchmark_model, interleaved_ratios
    small = dict(model_name="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 1}, batch_size=2)
    build_benchmark_model("linear@compile", **small)[2]()           # a first compiled model, run
    compiled, _, step = build_benchmark_model("lora@compile", **small)
    eager, _, eager_step = build_benchmark_model("lora", **small)
    initial = compiled.blocks[0].attn.peft_lora.a.detach().clone()
    for _ in range(2): step(); eager_step()                        # the second step gives A a gradient (B is 0 at first)
    assert not torch.equal(compiled.blocks[0].attn.peft_lora.a, initial)
    assert torch.allclose(compiled.blocks[0].attn.peft_lora.a, eager.blocks[0].attn.peft_lora.a, atol=1e-5)
    with pytest.raises(ValueError, match="at most one '@compile' spec per process"):
        interleaved_ratios(["linear", "lora@compile", "moppa@compile"], rounds=1, **small)
