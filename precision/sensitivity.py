"""Per-layer quantization sensitivity, and the mixed-precision keep-list it suggests.

Quantization error is rarely spread evenly: one layer (often the LM head, the first block or a
cross-attention block) can account for most of the lost agreement. This quantizes one group of
weight nodes at a time (a decoder layer, a cross-attention block, a ViT block, a perceiver
layer, the LM head), everything else left fp32, and measures parity against the fp32 export on
the same episodes (int8 ranges calibrated once, then reused from a calibration cache). The
groups that cost the most are the keep-list candidates for `quantize --keep-node`. `auto_mix`
turns the ranking into the cheapest mix that meets an accuracy budget (parity's gate, e.g.
``top1 >= 0.99`` or ``task_delta >= -0.01``): the smallest k of most sensitive groups kept at
the source precision, found by bisection over k; every evaluated k is reported.
"""

from __future__ import annotations

import glob
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from precision.graph import load_graph, name_nodes, weight_nodes
from precision.options import QuantizeError, QuantizeOptions
from precision.parity import OnnxBackend, gate, measure
from precision.quantize import quantize_export
from precision.rewrites import embedding_nodes
from runtime.manifest import load_manifest, safe_join
from runtime.tokenizer import load_export_tokenizer

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


@dataclass
class Evaluation:
    """What every candidate is measured on: the source export as reference, and the same
    episodes (labelled ones allow a `task_delta` budget). Loaded once, shared by the ranking and
    the budget search."""

    src: Path
    data: str = "random"
    episodes: int = 4
    decode_steps: int = 4
    max_shots: int = 2
    seed: int = 1234
    reference: Any = field(init=False, repr=False)
    tokenizer: Any = field(init=False, repr=False)
    episode_set: list[Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:

        self.src = Path(self.src)
        self.reference = OnnxBackend(self.src)
        self.tokenizer = load_export_tokenizer(self.src, self.reference.manifest)
        self.episode_set = calibration_set(
            self.data, episodes=self.episodes, max_shots=self.max_shots, seed=self.seed
        ).episodes

    @property
    def labelled(self) -> bool:
        return any(e.answer is not None for e in self.episode_set)

    def measure(self, candidate: Path) -> dict[str, Any]:
        return measure(
            self.reference, OnnxBackend(candidate), self.episode_set, self.tokenizer,
            self.decode_steps,
        )  # fmt: skip


def run_sensitivity(
    evaluation: Evaluation,
    graph: str,
    precision: str,
    base: QuantizeOptions,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One row per weight group: parity of `graph` with only that group at `precision`."""
    say = progress or (lambda _m: None)
    if graph not in ("vision", "decoder"):
        raise QuantizeError(f"graph must be 'vision' or 'decoder', not {graph!r}")
    if precision not in ("fp16", "int8", "int4"):
        raise QuantizeError(f"sensitivity needs fp16, int8 or int4, not {precision!r}")
    src = evaluation.src
    groups = weight_groups(_graph(src, graph))
    every = [n for nodes in groups.values() for n in nodes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="flamingo-sensitivity-") as tmp:
        work = Path(tmp)
        cache = base.calibration_cache or str(work / "ranges")
        for i, (group, nodes) in enumerate(groups.items()):
            mine = set(nodes)
            keep = tuple(glob.escape(n) for n in every if n not in mine)
            options = _options(base, graph, precision, keep, cache)
            out = work / "candidate"
            quantize_export(src, out, options)
            m = evaluation.measure(out)
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
    return {
        "graph": graph,
        "precision": precision,
        "episodes": evaluation.episodes,
        "groups": rows,
    }


def keep_list(result: dict[str, Any], top: int) -> list[str]:
    """`--keep-node` globs for the `top` most sensitive groups."""
    return [f"{glob.escape(r['group'])}/*" for r in result["groups"][:top]]


def _graph(src: Path, graph: str) -> Any:
    model = load_graph(safe_join(src, load_manifest(src).graphs[graph].file))
    name_nodes(model)
    return model


def _options(
    base: QuantizeOptions, graph: str, precision: str, keep: tuple[str, ...], cache: str
) -> QuantizeOptions:
    """`graph` at `precision` with `keep` left at fp32, the other graph fp32."""
    return replace(
        base,
        vision=precision if graph == "vision" else "fp32",
        decoder=precision if graph == "decoder" else "fp32",
        keep_nodes=keep,
        calibration_cache=cache,
        force=True,
    )


def auto_mix(
    evaluation: Evaluation,
    graph: str,
    precision: str,
    base: QuantizeOptions,
    budget: dict[str, float],
    ranking: dict[str, Any],
    *,
    output: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The fewest most-sensitive groups of `ranking` (run_sensitivity's result) to keep at fp32
    so that `graph` at `precision` meets `budget` (metric -> lower bound, as parity's
    thresholds); writes that export to `output`.

    Bisection assumes keeping more groups never hurts (true of the measured metrics up to
    noise); k = all groups is the fp32 graph, so an unmet budget there is an error.
    """
    say = progress or (lambda _m: None)
    if not budget:
        raise QuantizeError("an accuracy budget needs at least one metric bound")
    if "task_delta" in budget and not evaluation.labelled:
        raise QuantizeError(
            f"a task_delta budget needs labelled episodes; --data {evaluation.data} has none"
        )
    # the ranking's order (cosine first) even for a top-1 budget: a top-1-first order had to
    # keep more groups on the demo decoder (docs/measurements.md)
    order = [r["group"] for r in ranking["groups"]]
    tried: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="flamingo-auto-mix-") as tmp:
        work = Path(tmp)
        cache = base.calibration_cache or str(work / "ranges")

        def evaluate(k: int) -> bool:
            keep = (*base.keep_nodes, *keep_list(ranking, k))
            out = work / f"k{k}"
            quantize_export(evaluation.src, out, _options(base, graph, precision, keep, cache))
            failures = gate(evaluation.measure(out), budget)
            size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".onnx", ".data"))
            tried[k] = {"keep_groups": k, "failures": failures, "bytes": size}
            say(f"auto mix: keep {k}/{len(order)} groups: " + ("; ".join(failures) or "meets"))
            return not failures

        lo, hi = 0, len(order)  # invariant: hi meets the budget (checked), lo - 1 does not
        if not evaluate(hi):
            raise QuantizeError(
                f"{graph} cannot meet the budget even with every group kept at fp32: "
                + "; ".join(tried[hi]["failures"])
            )
        while lo < hi:
            mid = (lo + hi) // 2
            if evaluate(mid):
                hi = mid
            else:
                lo = mid + 1
        keep = [*base.keep_nodes, *keep_list(ranking, hi)]
        if output is not None:
            final = replace(_options(base, graph, precision, tuple(keep), cache), force=force)
            quantize_export(evaluation.src, output, final)
    return {
        "graph": graph,
        "precision": precision,
        "budget": budget,
        "order": order,
        "keep_groups": order[:hi],
        "keep_nodes": keep,
        "evaluated": [tried[k] for k in sorted(tried)],
        "output": str(output) if output is not None else None,
    }
