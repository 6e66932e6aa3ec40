"""Per-layer quantization sensitivity, and the mixed-precision keep-list it suggests.

Quantization error is rarely spread evenly: one layer (often the LM head, the first block or a
cross-attention block) can account for most of the lost agreement. This quantizes one group of
weight nodes at a time (a decoder layer, a cross-attention block, a ViT block, a perceiver
layer, the LM head), everything else left fp32, and measures parity against the fp32 export
on the same episodes. The groups that cost the most are the keep-list candidates: pass them to
`quantize --keep-node` to leave them fp32.

int8 ranges are calibrated once and reused from a calibration cache for every group.
"""

from __future__ import annotations

import glob
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from exporter.parity import OnnxBackend, measure
from exporter.quantize import (
    QuantizeError,
    QuantizeOptions,
    embedding_nodes,
    load_graph,
    name_nodes,
    quantize_export,
    weight_nodes,
)
from runtime.manifest import load_manifest, safe_join

from .data import calibration_set

Progress = Callable[[str], None]
_INDEXED = re.compile(r"^(.*?/[A-Za-z_]*(?:layers|blocks|resblocks|h)\.\d+)/")


def group_of(node_name: str) -> str:
    """`/lm/layers.3/self_attn/q_proj/MatMul` -> `/lm/layers.3`; unindexed nodes group by their
    parent scope (`/lm/lm_head/MatMul` -> `/lm/lm_head`)."""
    match = _INDEXED.match(node_name)
    if match:
        return match.group(1)
    return node_name.rsplit("/", 1)[0] or node_name


def weight_groups(model: Any) -> dict[str, list[str]]:
    """Weight GEMMs and embedding lookups, grouped by layer."""
    groups: dict[str, list[str]] = {}
    for name in (*weight_nodes(model), *embedding_nodes(model)):
        groups.setdefault(group_of(name), []).append(name)
    return groups


def run_sensitivity(
    src: str | Path,
    graph: str,
    precision: str,
    base: QuantizeOptions,
    *,
    data: str = "random",
    episodes: int = 4,
    decode_steps: int = 4,
    seed: int = 1234,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One row per weight group: parity of `graph` with only that group at `precision`."""
    from tokenizers import Tokenizer

    say = progress or (lambda _m: None)
    if graph not in ("vision", "decoder"):
        raise QuantizeError(f"graph must be 'vision' or 'decoder', not {graph!r}")
    if precision not in ("fp16", "int8", "int4"):
        raise QuantizeError(f"sensitivity needs fp16, int8 or int4, not {precision!r}")
    src = Path(src)
    manifest = load_manifest(src)
    model = load_graph(safe_join(src, manifest.graphs[graph].file))
    name_nodes(model)
    groups = weight_groups(model)
    every = [n for nodes in groups.values() for n in nodes]
    reference = OnnxBackend(src)
    tokenizer = Tokenizer.from_file(str(src / "tokenizer" / "tokenizer.json"))
    eval_set = calibration_set(data, episodes=episodes, seed=seed).episodes
    rows = []
    with tempfile.TemporaryDirectory(prefix="flamingo-sensitivity-") as tmp:
        work = Path(tmp)
        cache = base.calibration_cache or str(work / "ranges")
        for i, (group, nodes) in enumerate(groups.items()):
            mine = set(nodes)
            keep = tuple(glob.escape(n) for n in every if n not in mine)
            options = replace(
                base,
                vision=precision if graph == "vision" else "fp32",
                decoder=precision if graph == "decoder" else "fp32",
                keep_nodes=keep,
                calibration_cache=cache,
                force=True,
                extra={},
            )
            out = work / "candidate"
            quantize_export(src, out, options)
            m = measure(reference, OnnxBackend(out), eval_set, tokenizer, decode_steps)
            if graph == "vision":
                cosine = min(v["cosine"] for v in m["vision"].values())
                top1 = m["pipeline"]["top1"]
            else:
                cosine, top1 = m["decoder"]["cosine"], m["decoder"]["top1"]
            rows.append(
                {"group": group, "nodes": len(nodes), "cosine": cosine, "top1": top1,
                 "max_abs": m[graph if graph == "decoder" else "pipeline"]["max_abs"]}
            )  # fmt: skip
            shutil.rmtree(out)
            say(f"sensitivity: {i + 1}/{len(groups)} {group}: cosine {cosine:.6f} top-1 {top1:.4f}")
    rows.sort(key=lambda r: (r["cosine"], r["top1"]))
    return {"graph": graph, "precision": precision, "episodes": episodes, "groups": rows}


def keep_list(result: dict[str, Any], top: int) -> list[str]:
    """`--keep-node` globs for the `top` most sensitive groups."""
    return [f"{glob.escape(r['group'])}/*" for r in result["groups"][:top]]
