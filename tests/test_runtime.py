"""The torch-free pipeline: same tokens and text as the PyTorch reference, clear input errors,
and importable where torch and transformers cannot be imported."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo.generate import generate as reference_generate
from runtime.generation import GenerationConfig
from runtime.images import PreprocessConfig, preprocess
from runtime.pipeline import FlamingoPipeline
from tests.conftest import FAMILIES


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate([(40, 50), (64, 30)]):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pipeline_equals_reference(tiny_model, tiny_export, images, family: str) -> None:
    model, tok, _, _ = tiny_model(family)
    pipe = FlamingoPipeline(tiny_export(family))
    prompt = "<image>A red circle<|endofchunk|><image>A blue"
    assert pipe.tokenizer.encode(prompt).ids == tok(prompt)["input_ids"]
    out = pipe.generate(prompt, images)
    pixels = preprocess(images, PreprocessConfig(image_size=model.cfg.vision.image_size))
    vision_x = torch.from_numpy(pixels)[None, :, None]
    ref = reference_generate(model, vision_x, tok(prompt, return_tensors="pt")["input_ids"])
    assert out.token_ids == ref.sequences[0]
    assert np.allclose(out.logprobs, ref.logprobs[0], atol=1e-4)
    eoc = model.cfg.eoc_token_id
    assert out.text == tok.decode(
        [t for t in ref.sequences[0] if t != eoc], skip_special_tokens=True
    )


def test_pipeline_input_errors_keep_it_usable(tiny_export, images, tmp_path) -> None:
    pipe = FlamingoPipeline(tiny_export("llama"))
    with pytest.raises(ValueError, match="2 <image> markers but 1 image was given"):
        pipe.generate("<image>a<image>b", images[:1])
    with pytest.raises(ValueError, match="empty"):
        pipe.generate("  ", [])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png"):
        pipe.generate("<image>a", [str(bad)])
    with pytest.raises(ValueError, match="maximum context"):
        pipe.generate("<image>a", images[:1], GenerationConfig(max_new_tokens=10_000))
    assert pipe.generate("<image>a", images[:1], GenerationConfig(max_new_tokens=3)).token_ids


def test_runtime_imports_and_runs_without_torch(tiny_export, images) -> None:
    code = f"""
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from runtime.pipeline import FlamingoPipeline
from runtime.generation import GenerationConfig
out = FlamingoPipeline({str(tiny_export("mpt"))!r}).generate(
    "<image>A", [{images[0]!r}], GenerationConfig(max_new_tokens=4))
assert len(out.token_ids) >= 1
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
