"""`flamingo-export plan`: memory of OpenFlamingo-3B/4B/9B on Jetson targets, recomputed here
from the released models' dims, and the parameter formulas checked against real modules."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from click.testing import CliRunner

from cli.main import main
from tests.conftest import FAMILIES
from trt.plan import PlanInputs, inventory, plan_preset, preset_config
from trt.targets import TARGETS, get_target

GiB = 1 << 30

# Released-model dims, written out independently of trt/plan.py: ViT-L/14 at 224 px,
# Perceiver (6 x [8 heads x 64], ff x4, 64 latents), cross-attention 8 x 64 every n layers,
# and the LM's config.json (vocabulary 50432 in all three).
VIT = {"w": 1024, "layers": 24, "patch": 14, "tokens": 257, "heads": 16}
LMS = {
    "OpenFlamingo-3B-vitl-mpt1b": dict(kind="mpt", d=2048, L=24, every=1, qk_ln=True, tied=True),
    "OpenFlamingo-4B-vitl-rpj3b": dict(kind="neox", d=2560, L=32, every=2, qk_ln=False, tied=False),
    "OpenFlamingo-9B-vitl-mpt7b": dict(kind="mpt", d=4096, L=32, every=4, qk_ln=False, tied=True),
}
V = 50432


def first_principles(name: str) -> dict[str, int]:
    """Parameters by storage class: linear (quantizable) weights, and everything else."""
    w, m = VIT["w"], LMS[name]
    d, L = m["d"], m["L"]
    n_x = L // m["every"]
    # ViT: per block 12 w^2 matrix weights + 13 w (biases 9w, two LayerNorms 4w)
    vit_lin = VIT["layers"] * 12 * w * w
    vit_other = 3 * 14 * 14 * w + w + 257 * w + 2 * w + VIT["layers"] * 13 * w
    # Perceiver, per layer: q (w->512), kv (w->1024), out (512->w), ff w->4w->w; 3 LNs
    per_lin = 6 * (w * 512 + w * 1024 + 512 * w + 8 * w * w)
    per_other = 64 * w + 6 * 3 * 2 * w + 2 * w
    # gated cross-attention, per block: q (d->512), kv (1024->1024), out (512->d), ff d->4d->d
    x_lin = n_x * (d * 512 + w * 1024 + 512 * d + 8 * d * d)
    x_other = n_x * (4 * d + 2)
    # decoder: qkv + out + mlp (4x) = 12 d^2 per layer
    lm_lin = L * 12 * d * d
    if m["kind"] == "mpt":  # bias-free LayerNorms (+ MosaicGPT q/k LayerNorms), final LN
        lm_other = L * (2 * d + (2 * d if m["qk_ln"] else 0)) + d
    else:  # GPT-NeoX: biases (qkv 3d, dense d, mlp 4d + d) and two LNs with bias, final LN
        lm_other = L * (3 * d + d + 4 * d + d + 4 * d) + 2 * d
    emb = V * d * (1 if m["tied"] else 2)
    return {
        "linear": vit_lin + per_lin + x_lin + lm_lin,
        "other": vit_other + per_other + x_other + lm_other,
        "embeddings": emb,
        "linear_out_channels": (
            VIT["layers"] * (3 * w + w + 4 * w + w)
            + 6 * (512 + 1024 + w + 4 * w + w)
            + n_x * (512 + 1024 + d + 4 * d + d)
            + L * (3 * d + d + 4 * d + d)
        ),
        "linear_blocks": (  # ceil(fan_in / 128) x fan_out per matrix (all fan_in % 128 == 0)
            VIT["layers"] * (w * 3 * w + w * w + w * 4 * w + 4 * w * w) // 128
            + 6 * (w * 512 + w * 1024 + 512 * w + 8 * w * w) // 128
            + n_x * (d * 512 + w * 1024 + 512 * d + 8 * d * d) // 128
            + L * 12 * d * d // 128
        ),
        "n_x": n_x,
        "d": d,
        "L": L,
    }


def expected_bytes(name: str, precision: str, batch: int, seq: int, images: int) -> dict:
    p = first_principles(name)
    params = p["linear"] + p["other"] + p["embeddings"]
    if precision in ("fp32", "fp16"):
        weights = params * (4 if precision == "fp32" else 2)
    elif precision == "int8":  # 1 byte + an fp32 scale per output channel
        weights = p["linear"] + 4 * p["linear_out_channels"] + 2 * (p["other"] + p["embeddings"])
    else:  # 4 bits + an fp16 scale per 128-input block
        weights = p["linear"] // 2 + 2 * p["linear_blocks"] + 2 * (p["other"] + p["embeddings"])
    act = 4 if precision == "fp32" else 2
    kv = 2 * p["L"] * p["d"] * seq * batch * act  # K and V, all heads
    cross_per_image = 2 * p["n_x"] * 8 * 64 * 64 * act
    return {
        "params": params,
        "weights": weights,
        "kv_cache": 2 * kv,  # two buffers (present of step t = past of step t+1)
        # vision output + per-row inputs (x2, beam reordering) + each row's current image
        "cross_kv": cross_per_image * (images * (1 + 2 * batch) + batch),
    }


PRESETS3 = tuple(LMS)


@pytest.mark.parametrize("name", PRESETS3)
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_orin_nano_numbers_match_first_principles(name: str, precision: str) -> None:
    target = get_target("orin-nano-8gb")
    plan = plan_preset(name, target, PlanInputs(1, 32, 2048, precision))
    exp = expected_bytes(name, precision, batch=1, seq=2048, images=32)
    assert plan.params["total"] == exp["params"]
    for key in ("weights", "kv_cache", "cross_kv"):
        assert plan.lines[key] == exp[key], key
    assert plan.lines["workspace"] == target.workspace_bytes
    assert plan.lines["runtime"] == target.runtime_overhead_bytes
    assert plan.total_bytes == sum(plan.lines.values())
    assert plan.usable_bytes == 8 * GiB - target.os_reserve_bytes
    assert plan.fits == (plan.total_bytes <= plan.usable_bytes)


def test_param_counts_are_the_released_sizes() -> None:
    """~2.6B / ~4.0B / ~8.1B: the '3B/4B/9B' of the names (ViT + resampler + LM + x-attn)."""
    totals = {n: first_principles(n) for n in PRESETS3}
    totals = {n: p["linear"] + p["other"] + p["embeddings"] for n, p in totals.items()}
    assert 2.5e9 < totals["OpenFlamingo-3B-vitl-mpt1b"] < 2.7e9
    assert 3.9e9 < totals["OpenFlamingo-4B-vitl-rpj3b"] < 4.2e9
    assert 8.0e9 < totals["OpenFlamingo-9B-vitl-mpt7b"] < 8.3e9
    # MPT-7B alone is 6.65B parameters (its model card: 6.7B)
    lm = inventory(preset_config("OpenFlamingo-9B-vitl-mpt7b"))
    assert 6.6e9 < lm["language_model"].params < 6.7e9


def test_verdicts_are_sane_on_orin_nano() -> None:
    nano = get_target("orin-nano-8gb")

    def plan(name: str, precision: str, seq: int = 2048):
        return plan_preset(name, nano, PlanInputs(1, 32, seq, precision))

    nine = "OpenFlamingo-9B-vitl-mpt7b"
    assert not plan(nine, "fp16").fits  # 15 GiB of weights in 8 GB
    assert plan(nine, "fp16").largest_max_seq_len is None
    assert plan(nine, "fp16").lines["weights"] > 15 * GiB
    assert not plan(nine, "int8").fits
    three = "OpenFlamingo-3B-vitl-mpt1b"
    assert plan(three, "int8").fits and plan(three, "int4").fits
    assert plan(three, "int4").largest_max_seq_len == 2048
    four = "OpenFlamingo-4B-vitl-rpj3b"
    assert plan(four, "int4").fits and not plan(four, "fp16").fits
    # int8 4B fits only with a shorter context; the reported length is the exact boundary
    p = plan(four, "int8")
    n = p.largest_max_seq_len
    assert not p.fits and n is not None and 1 < n < 2048
    assert plan(four, "int8", n).fits and not plan(four, "int8", n + 1).fits
    # less precision never needs more memory
    for name in PRESETS3:
        sizes = [plan(name, q).total_bytes for q in ("fp32", "fp16", "int8", "int4")]
        assert sizes == sorted(sizes, reverse=True)
    # the big board holds 9B at fp16
    agx = plan_preset(nine, get_target("orin-agx-64gb"), PlanInputs(1, 32, 2048, "fp16"))
    assert agx.fits


def test_kv_cache_scales_with_batch_and_context() -> None:
    nano = get_target("orin-nano-8gb")
    a = plan_preset("OpenFlamingo-3B-vitl-mpt1b", nano, PlanInputs(1, 4, 1024, "int4"))
    b = plan_preset("OpenFlamingo-3B-vitl-mpt1b", nano, PlanInputs(3, 4, 2048, "int4"))
    assert b.lines["kv_cache"] == 6 * a.lines["kv_cache"]
    # 24 layers x 2048 wide x K,V x fp16 = 192 KiB per token per row, two buffers
    assert a.lines["kv_cache"] == 2 * 1024 * 24 * 2 * 2048 * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_inventory_counts_the_real_modules(tiny_model, family: str) -> None:
    """The parameter formulas equal sum(p.numel()) of our PyTorch modules (tied weights once)."""
    from flamingo.inspect import count

    model, _, _, _ = tiny_model(family)
    inv = inventory(model.cfg)
    lm = model.lang_model
    assert inv["vision_encoder"].params + inv["vision_encoder"].unused == count(
        model.vision_encoder
    )
    assert inv["perceiver"].params == count(model.perceiver)
    xattn = inv["cross_attention"].params + inv["cross_attention_kv"].params
    assert xattn == count(lm.cross_attn_layers)
    assert inv["language_model"].params == count(lm) - count(lm.cross_attn_layers)


def test_plan_cli_preset_and_export(tiny_export) -> None:
    runner = CliRunner()
    args = ["plan", "--target", "orin-nano-8gb", "--preset", "OpenFlamingo-9B-vitl-mpt7b"]
    result = runner.invoke(main, [*args, "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    assert "DOES NOT FIT" in result.output and "OS reserve 1.5 GiB" in result.output
    data = json.loads(runner.invoke(main, [*args, "--precision", "int4", "--json"]).output)
    assert data["target"]["name"] == "orin-nano-8gb" and data["precision"] == "int4"
    assert (
        data["bytes"]["weights"]
        == expected_bytes("OpenFlamingo-9B-vitl-mpt7b", "int4", 1, 2048, 32)["weights"]
    )
    out = tiny_export("llama")
    data = json.loads(runner.invoke(main, ["plan", "--export", str(out), "--json"]).output)
    assert data["fits"] is True and data["precision"] == "fp32"
    assert data["largest_max_seq_len"] == data["seq_cap"]
    result = runner.invoke(main, ["plan", "--target", "x86-gpu"])
    assert result.exit_code == 2 and "exactly one of --preset" in result.output
    result = runner.invoke(main, ["plan", "--preset", "nope"])
    assert result.exit_code == 1 and "unknown preset" in result.output


def test_targets_table_is_complete() -> None:
    for t in TARGETS.values():
        assert t.usable_bytes > 0 and t.workspace_bytes > 0 and t.reserve_note
        assert t.default_trt in ("8.5", "8.6", "10")
    assert {t.compute_capability for t in TARGETS.values() if t.jetpacks} == {"8.7"}
    assert math.isclose(get_target("orin-nano-8gb").memory_bytes / GiB, 8)


def test_int8_note_says_what_quantize_writes() -> None:
    """The note describes the quantized exports that exist (quantize's embedding default)."""
    from precision.quantize import QuantizeOptions

    nano = get_target("orin-nano-8gb")
    notes = plan_preset("OpenFlamingo-3B-vitl-mpt1b", nano, PlanInputs(1, 32, 2048, "int8")).notes
    assert QuantizeOptions().quantize_embeddings  # the default the note contrasts with
    assert any("--no-quantize-embeddings" in n for n in notes), notes
    assert not any("separate issue" in n for n in notes), notes


def test_jetson_doc_table_is_plan_output() -> None:
    """docs/jetson.md's Orin Nano table: each cell is what `plan` computes."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "jetson.md").read_text()
    nano = get_target("orin-nano-8gb")
    names = {"3B": "OpenFlamingo-3B-vitl-mpt1b", "4B": "OpenFlamingo-4B-vitl-rpj3b",
             "9B": "OpenFlamingo-9B-vitl-mpt7b"}  # fmt: skip
    rows = 0
    for size, name in names.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| OpenFlamingo-{size}"))
        for cell, precision in zip(row.strip("|").split("|")[1:], ("fp16", "int8", "int4")):
            p = plan_preset(name, nano, PlanInputs(1, 32, 2048, precision))
            verdict = (
                "fits" if p.fits
                else f"up to {p.largest_max_seq_len} tokens" if p.largest_max_seq_len else "no"
            )  # fmt: skip
            expected = f"{p.lines['weights'] / GiB:.2f} / {p.total_bytes / GiB:.2f} GiB: {verdict}"
            assert cell.strip() == expected, (name, precision)
            rows += 1
    assert rows == 9


def test_inplace_form_counts_the_kv_cache_once(tiny_export, tmp_path) -> None:
    """An export whose decoder appends in place is planned with one KV copy (and a note);
    the portable one with two; TensorRT refuses to build the in-place form."""
    from exporter.decoder_forms import derive_export
    from runtime.manifest import load_manifest
    from runtime.spec import DecoderForm
    from trt.build import BuildError, make_build_plan
    from trt.plan import plan_export

    src = tiny_export("llama")
    out = derive_export(src, tmp_path / "inplace", DecoderForm(kv_cache="inplace"))
    target = get_target("orin-nano-8gb")
    inputs = PlanInputs(1, 4, 512, "fp32")
    two = plan_export(load_manifest(src), "portable", target, inputs)
    one = plan_export(out, "inplace", target, inputs)
    assert two.lines["kv_cache"] == 2 * one.lines["kv_cache"] > 0
    assert any("in place" in n for n in one.notes) and "x1 buffer)" in one.format()
    with pytest.raises(BuildError, match="portable"):
        make_build_plan(out)


def test_plan_says_when_tensorrt_cannot_build_the_export(tiny_export, tmp_path) -> None:
    """An export whose graphs run on onnxruntime only (dynamic int8 here) gets a note on a
    TensorRT target instead of a bare verdict (breaker pass 2); a portable fp32 one none."""
    from precision.quantize import QuantizeOptions, quantize_export
    from runtime.manifest import load_manifest
    from trt.plan import plan_export

    src = tiny_export("llama")
    out = tmp_path / "dynamic"
    quantize_export(src, out, QuantizeOptions(decoder="int8", vision="int8", int8_mode="dynamic"))
    target = get_target("orin-nano-8gb")
    inputs = PlanInputs(1, 4, 512, "int8")
    notes = plan_export(load_manifest(out), "dynamic", target, inputs).notes
    assert any("vision and decoder graph(s) run on onnxruntime only" in n for n in notes), notes
    fp32 = plan_export(load_manifest(src), "fp32", target, replace(inputs, precision="fp32"))
    assert not any("onnxruntime only" in n for n in fp32.notes)
