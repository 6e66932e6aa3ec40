"""Why int4's top-1 gate says little on a random tiny model (issue 16, deliver 4).

Simulates int4 weights (blockwise symmetric along K, as precision/rewrites.to_int4 writes
them; embeddings int8 per row) on the PyTorch reference and reports, per model: the median
top-1/top-2 logit margin, the int4 logit error, and top-1 agreement, with the LM head at int4,
int8 (per row) or fp32, blocks of 32 and 128. Models: the tiny random IDEFICS of
tests/precision/test_idefics_parity.py with the fixture's default weights and with
`fixtures.idefics.CONDITIONED`, and the trained demo model (models/demo).

    python benchmarks/int4_margins.py OUT_DIR
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch


def int4_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    qmax = 7
    pad = (-w.shape[1]) % block
    x = torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, block)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    q = (x / scale).round().clamp(-qmax - 1, qmax) * scale
    return q.reshape(w.shape[0], -1)[:, : w.shape[1]]


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (w / scale).round().clamp(-128, 127) * scale


def quantized(model: torch.nn.Module, block: int, head: str) -> torch.nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.startswith("vision"):
                if name.endswith("lm_head"):
                    if head != "fp32":
                        mod.weight.copy_(int8_rows(mod.weight) if head == "int8" else
                                         int4_blocks(mod.weight, block))  # fmt: skip
                else:
                    mod.weight.copy_(int4_blocks(mod.weight, block))
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.copy_(int8_rows(mod.weight))
    return m


def logits(model: torch.nn.Module, batches: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(v, i).flatten(0, 1) for i, v in batches])


def report(name: str, model: torch.nn.Module, batches: list) -> None:
    ref = logits(model, batches)
    top = ref.topk(2, -1).values
    margin = (top[..., 0] - top[..., 1]).median()
    spread = ref.std(-1).median()
    print(f"{name}: {len(ref)} positions, median top-1/top-2 margin {margin:.3f} "
          f"({margin / spread:.2f} logit std)")  # fmt: skip
    for block in (32, 128):
        for head in ("int4", "int8", "fp32"):
            got = logits(quantized(model, block, head), batches)
            err = (got - ref).std()
            cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0)
            top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean()
            print(f"  block {block:3d}, head {head}: top-1 {top1:.3f}, cosine {cos:.4f}, "
                  f"error std {err:.3f}, margin / error {margin / err:.2f}")  # fmt: skip


def idefics_batches(model: torch.nn.Module, tok, rng: np.random.Generator) -> list:
    cfg = model.cfg
    fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
    rows = []
    for _ in range(2):
        ids = [tok.bos_token_id]
        for _ in range(2):
            ids += [fake, cfg.media_token_id, fake, *rng.integers(3, 200, 20).tolist()]
        rows.append(ids)
    size = cfg.vision.image_size
    return [(torch.tensor(rows), torch.randn(2, 2, 1, 3, size, size))]


def main(out: Path) -> None:
    from demo.task import eval_episodes
    from fixtures.idefics import CONDITIONED, build_tiny_idefics
    from flamingo.idefics import load_idefics
    from flamingo.loaders import load_flamingo
    from runtime.images import PreprocessConfig, preprocess

    torch.manual_seed(0)
    for name, kw in (("default random weights", {}), ("CONDITIONED", CONDITIONED)):
        folder = out / name.split()[0].lower()
        if not folder.exists():
            build_tiny_idefics(folder, cross_layer_interval=2, qk_layer_norms=True, **kw)
        model, tok, _ = load_idefics(folder)
        report(
            f"tiny IDEFICS, {name}", model, idefics_batches(model, tok, np.random.default_rng(0))
        )
    root = Path(__file__).resolve().parents[1] / "models" / "demo"
    demo, tok, _ = load_flamingo(root / "lm", root / "open_clip_model.safetensors",
                                 root / "checkpoint.safetensors")  # fmt: skip
    pre = PreprocessConfig(image_size=demo.cfg.vision.image_size)
    batches = [
        (torch.tensor([tok(ep.prompt() + ep.answer)["input_ids"]]),
         torch.from_numpy(preprocess(ep.images(), pre))[None, :, None])
        for ep in eval_episodes(6, 1234, shots=2)
    ]  # fmt: skip
    report("trained demo model (models/demo)", demo, batches)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
