"""Prompts and images shared by the parity tests: interleaved multi-image prompts, text before
the first image, and a left-padded batch whose rows have different image counts."""

from __future__ import annotations

import torch

PROMPTS = (
    "<image>A red circle<|endofchunk|><image>A blue",
    "Look: <image>Output:",  # text before the first image
    "<image>one<|endofchunk|><image>two<|endofchunk|><image>",
)


def batch(tokenizer, image_size: int, prompts=PROMPTS, seed: int = 0):
    """(vision_x (B, T_img, 1, 3, S, S), input_ids (B, T) left-padded, attention_mask, images
    per row). Rows with fewer images get zero images appended (never attended to)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    counts = [p.count("<image>") for p in prompts]
    g = torch.Generator().manual_seed(seed)
    vision_x = torch.zeros(len(prompts), max(counts), 1, 3, image_size, image_size)
    for b, n in enumerate(counts):
        vision_x[b, :n] = torch.randn(n, 1, 3, image_size, image_size, generator=g)
    return vision_x, enc["input_ids"], enc["attention_mask"], counts
