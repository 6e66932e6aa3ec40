"""Soak: one process, thousands of mixed few-shot requests, resident memory sampled.

Every request is a caption or VQA few-shot prompt with 0-4 demonstrations drawn from a pool
that churns (each request replaces a pool entry with a new image with probability --churn),
a new query image every time (random size and content), and mixed search settings (greedy,
beam 2, seeded sampling). The pipeline's vision cache (K/V by pixel hash, 256 MiB cap) and
prefix cache (8 entries) fill and then evict; RSS (from /proc/self/statm) should stop
growing once they are full. Prints and writes (--json) the samples and where RSS went flat.

    python benchmarks/soak.py out/demo/export --requests 2000 --json out/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.generation import GenerationConfig
from runtime.pipeline import FlamingoPipeline
from runtime.prompts import Demonstration, build_few_shot_prompt

WORDS = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "cross", "small",
         "large", "one", "two", "three", "left", "right"]  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def new_image(rng: np.random.Generator) -> Image.Image:
    h, w = (int(x) for x in rng.integers(24, 160, size=2))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def flat_from(samples: list[dict[str, Any]], tolerance: float) -> int | None:
    """The first sampled request after which RSS stays within `tolerance` (relative) of the
    final sample's RSS."""
    final = samples[-1]["rss_mb"]
    start = None
    for s in samples:
        if abs(s["rss_mb"] - final) <= tolerance * final:
            start = s["request"] if start is None else start
        else:
            start = None
    return start


def soak(export: Path, requests: int, churn: float, every: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    pipe = FlamingoPipeline(export)
    pool: list[tuple[Image.Image, str]] = [
        (new_image(rng), " ".join(pick.sample(WORDS, 2))) for _ in range(12)
    ]
    samples: list[dict[str, Any]] = []
    start = time.perf_counter()
    tokens = 0
    for i in range(1, requests + 1):
        if pick.random() < churn:
            pool[pick.randrange(len(pool))] = (new_image(rng), " ".join(pick.sample(WORDS, 2)))
        shots = pick.randint(0, 4)
        task = "vqa" if i % 3 == 0 else "caption"
        demos = [
            Demonstration(image, text=words)
            if task == "caption"
            else Demonstration(image, question="what is it?", answer=words)
            for image, words in pick.sample(pool, shots)
        ]
        prompt, media = build_few_shot_prompt(
            demos, "what is it?" if task == "vqa" else None, task, query_image=new_image(rng)
        )
        mode = i % 4
        config = GenerationConfig(
            max_new_tokens=pick.randint(1, 6),
            num_beams=2 if mode == 1 else 1,
            do_sample=mode == 2,
            seed=i if mode == 2 else None,
            top_k=5,
        )
        out = pipe.generate(prompt, media, config)
        tokens += len(out.token_ids)
        if i % every == 0 or i == 1:
            samples.append(
                {
                    "request": i,
                    "rss_mb": round(rss_bytes() / 2**20, 1),
                    "vision_cache_mb": round(pipe.vision_cache.bytes / 2**20, 1),
                    "vision_cache_entries": len(pipe.vision_cache),
                    "prefix_cache_mb": round(pipe.prefix_cache.lru.bytes / 2**20, 1),
                    "prefix_cache_entries": len(pipe.prefix_cache.lru),
                    "elapsed_s": round(time.perf_counter() - start, 1),
                }
            )
            s = samples[-1]
            print(f"request {i:>5}: RSS {s['rss_mb']:7.1f} MB, vision cache "
                  f"{s['vision_cache_mb']:6.1f} MB ({s['vision_cache_entries']} images), prefix "
                  f"cache {s['prefix_cache_entries']} entries, {s['elapsed_s']:.0f} s",
                  flush=True)  # fmt: skip
    rss = [s["rss_mb"] for s in samples]
    half = rss[len(rss) // 2 :]
    return {
        "export": str(export),
        "requests": requests,
        "churn": churn,
        "seed": seed,
        "generated_tokens": tokens,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": platform.processor() or platform.machine(),
        "rss_mb": {
            "first": rss[0],
            "max": max(rss),
            "last": rss[-1],
            "second_half_min": min(half),
            "second_half_max": max(half),
        },
        "flat_within_2pct_from_request": flat_from(samples, 0.02),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--churn", type=float, default=0.3, help="P(new pool image) per request")
    parser.add_argument("--every", type=int, default=100, help="Sample RSS every N requests.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = soak(args.export, args.requests, args.churn, args.every, args.seed)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
