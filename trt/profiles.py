"""TensorRT optimization profiles (min/opt/max per symbolic dimension) from the graph contract.

Every dynamic axis in `runtime/spec.py` is named; a TensorRT engine needs, for every input, a
min/opt/max shape per optimization profile. This module turns the export manifest's limits
(`max_images`, `max_seq_len`, `max_frames`) plus `max_batch` into those ranges, for `check` (is
every symbolic dim covered?) and `build` (the profiles themselves). Pure data: no onnx, no
TensorRT. The vision graph gets an image profile, and a clip profile when the export takes
clips (why in `vision_profiles`); the decoder three (prefill, extend, decode: why in
`decoder_profiles` and docs/jetson.md, "Optimization profiles"); the opt values are documented
on `OPT_*`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.errors import FlamingoExportError
from runtime.spec import (
    BATCH,
    LOGITS_POSITIONS,
    MEDIA_KEYS,
    NUM_FRAMES,
    NUM_IMAGES,
    PAST_SEQUENCE,
    SEQUENCE,
    TOTAL_SEQUENCE,
    GraphSpec,
    ModelDims,
)

# max_batch is not in the manifest (the ONNX graphs take any batch): an engine fixes it. 1 is
# greedy decoding of one prompt, the common case on an 8 GB device; beam search with k beams
# needs --max-batch k (the search expands the batch to the beams after prefill).
DEFAULT_MAX_BATCH = 1
# opt prompt length: OpenFlamingo's few-shot prompts (4-8 shots of caption/VQA) are ~100-300
# tokens; the decode profile's opt past length is the same prompt plus a few new tokens.
OPT_PROMPT_TOKENS = 256
# opt image count: the headline OpenFlamingo evaluation is 4-shot, i.e. 4 shots + 1 query image.
OPT_IMAGES = 5

# Longest chunk the extend profile takes after a cached prefix: a few-shot query ("<image>
# Question: ... Short answer:") is well under 64 tokens; longer tails are chunked at runtime.
EXTEND_TOKENS = 64
# opt chunk: a caption query "<image>Output:" is ~5 tokens, a VQA query ~15-25.
OPT_EXTEND_TOKENS = 16


class ProfileError(FlamingoExportError, ValueError):
    """Limits cannot give valid optimization profiles (or a graph dim has no range)."""


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ProfileError(f"invalid range min {self.min} <= opt {self.opt} <= max {self.max}")

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Limits:
    """What an engine is built for: rows per step, media items (images or clips) per row,
    tokens per row, frames per clip."""

    max_batch: int
    max_images: int
    max_seq_len: int
    max_frames: int = 1

    @classmethod
    def resolve(
        cls,
        manifest_limits: dict[str, int],
        max_batch: int | None = None,
        max_images: int | None = None,
        max_seq_len: int | None = None,
        max_frames: int | None = None,
    ) -> Limits:
        """The export's limits, optionally lowered (never raised: the export declares what the
        runtime and its prompt checks were built for)."""
        out = {"max_batch": max_batch if max_batch is not None else DEFAULT_MAX_BATCH}
        for key, value in (
            ("max_images", max_images),
            ("max_seq_len", max_seq_len),
            ("max_frames", max_frames),
        ):
            declared = int(manifest_limits[key])
            if value is not None and value > declared:
                raise ProfileError(
                    f"--{key.replace('_', '-')} {value} exceeds the export's {key} {declared}; "
                    "re-export with a larger limit"
                )
            out[key] = value if value is not None else declared
        for key, value in out.items():
            if value < 1:
                raise ProfileError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        return cls(**out)

    def to_dict(self) -> dict[str, int]:
        return {
            "max_batch": self.max_batch,
            "max_images": self.max_images,
            "max_seq_len": self.max_seq_len,
            "max_frames": self.max_frames,
        }


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a range for every symbolic dim of one graph."""

    name: str
    dims: dict[str, DimRange] = field(hash=False)

    def shapes(self, spec: GraphSpec) -> dict[str, tuple[list[int], list[int], list[int]]]:
        """(min, opt, max) shape of every graph input; a symbolic dim without range is an error."""
        out = {}
        for t in spec.inputs:
            corners: tuple[list[int], list[int], list[int]] = ([], [], [])
            for d in t.shape:
                if isinstance(d, int):
                    values = (d, d, d)
                elif d in self.dims:
                    r = self.dims[d]
                    values = (r.min, r.opt, r.max)
                else:
                    raise ProfileError(
                        f"profile {self.name!r}: input {t.name!r} has symbolic dim {d!r} with no "
                        f"range (known: {sorted(self.dims)})"
                    )
                for corner, v in zip(corners, values):
                    corner.append(v)
            out[t.name] = corners
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dims": {k: r.to_list() for k, r in self.dims.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(d["name"], {k: DimRange(*v) for k, v in d["dims"].items()})


def clips_per_run(limits: Limits) -> int:
    """Clips of up to max_frames frames one vision run takes (the clip profile's num_images):
    as many frames as a run of max_images images, at least one clip."""
    return max(1, limits.max_images // limits.max_frames)


def vision_profiles(dims: ModelDims, limits: Limits) -> list[Profile]:
    """ "images" (num_frames 1, up to max_images per run) and, when the export takes clips,
    "clips" (2..max_frames frames, up to `clips_per_run` per run; runtimes split larger
    batches). Why two: one profile's max corner would be max_images x max_frames frames, and
    TensorRT reserves activation memory for its max; this way a run never holds more frames
    than max_images images (or one clip), and images keep kernels timed for one frame."""
    n = limits.max_images
    images = {NUM_IMAGES: DimRange(1, min(OPT_IMAGES, n), n), NUM_FRAMES: DimRange(1, 1, 1)}
    profiles = [Profile("images", images)]
    if limits.max_frames > 1:
        clips = clips_per_run(limits)
        f = limits.max_frames
        profiles.append(
            Profile(
                "clips",
                {
                    NUM_IMAGES: DimRange(1, min(OPT_IMAGES, clips), clips),
                    NUM_FRAMES: DimRange(2, f, f),
                },
            )
        )
    return profiles


def decoder_profiles(dims: ModelDims, limits: Limits) -> list[Profile]:
    """prefill (past 0, any prompt), extend (past 1..max-C, sequence 1..C, C = EXTEND_TOKENS:
    a short chunk after a cached prefix), decode (one new token after any past). Longer
    continuations are run in chunks by the runtime. extend is left out when max_seq_len < 4.

    Why not one profile: the decoder ties `total_sequence = past_sequence + sequence`, and one
    range over every phase has a max corner (past max-1 + sequence max) that contradicts
    `total_sequence <= max`; widening total to 2*max-1 would make TensorRT reserve memory for a
    shape that never runs (it sizes activations from max). Each profile is consistent at min,
    opt and max (`check_consistency`). And decode, run once per generated token, is a
    matrix-vector product that wants other kernels (timed at opt) than prefill's matrix-matrix
    one; decode dominates generation time on a Jetson.
    """
    b, s, latents = limits.max_batch, limits.max_seq_len, dims.num_latents
    opt_images = min(OPT_IMAGES, limits.max_images)
    media = DimRange(latents, opt_images * latents, limits.max_images * latents)
    prompt = min(OPT_PROMPT_TOKENS, s)
    profiles = [
        Profile(
            "prefill",
            {
                BATCH: DimRange(1, 1, b),  # one prompt; beams are expanded after prefill
                SEQUENCE: DimRange(1, prompt, s),
                PAST_SEQUENCE: DimRange(0, 0, 0),
                TOTAL_SEQUENCE: DimRange(1, prompt, s),
                MEDIA_KEYS: media,
                LOGITS_POSITIONS: DimRange(1, 1, s),  # generation: last; parity: all
            },
        )
    ]
    chunk = extend_tokens(s)
    if chunk:
        seq_opt = min(OPT_EXTEND_TOKENS, chunk)
        past_opt = min(prompt, s - chunk)
        profiles.append(
            Profile(
                "extend",
                {
                    BATCH: DimRange(1, 1, b),
                    SEQUENCE: DimRange(1, seq_opt, chunk),
                    PAST_SEQUENCE: DimRange(1, past_opt, s - chunk),
                    TOTAL_SEQUENCE: DimRange(2, past_opt + seq_opt, s),
                    MEDIA_KEYS: media,
                    LOGITS_POSITIONS: DimRange(1, 1, chunk),
                },
            )
        )
    past_opt = min(prompt, s - 1)
    profiles.append(
        Profile(
            "decode",
            {
                BATCH: DimRange(1, b, b),  # greedy or b beams: the hot loop runs at full batch
                SEQUENCE: DimRange(1, 1, 1),
                PAST_SEQUENCE: DimRange(0, past_opt, s - 1),
                TOTAL_SEQUENCE: DimRange(1, past_opt + 1, s),
                MEDIA_KEYS: media,
                LOGITS_POSITIONS: DimRange(1, 1, 1),
            },
        )
    )
    return profiles


def extend_tokens(max_seq_len: int) -> int:
    """Chunk length of the extend profile for a context (0: no extend profile)."""
    return min(EXTEND_TOKENS, max_seq_len // 2) if max_seq_len >= 4 else 0


def graph_profiles(graph: str, dims: ModelDims, limits: Limits) -> list[Profile]:
    if graph == "vision":
        return vision_profiles(dims, limits)
    if graph == "decoder":
        return decoder_profiles(dims, limits)
    raise ProfileError(f"no optimization profiles defined for graph {graph!r}")


def check_consistency(profile: Profile) -> list[str]:
    """Problems with total = past + sequence, and logits positions <= sequence (a position
    index picks one of the new tokens), at min, opt and max (empty list = consistent)."""
    d = profile.dims
    if not {PAST_SEQUENCE, SEQUENCE, TOTAL_SEQUENCE} <= set(d):
        return []
    problems = []
    for corner in ("min", "opt", "max"):
        past, seq, total = (
            getattr(d[k], corner) for k in (PAST_SEQUENCE, SEQUENCE, TOTAL_SEQUENCE)
        )
        if past + seq != total:
            problems.append(
                f"profile {profile.name!r} at {corner}: {PAST_SEQUENCE} {past} + {SEQUENCE} {seq} "
                f"!= {TOTAL_SEQUENCE} {total}"
            )
        keep = getattr(d[LOGITS_POSITIONS], corner) if LOGITS_POSITIONS in d else 1
        if not 1 <= keep <= seq:
            problems.append(
                f"profile {profile.name!r} at {corner}: {LOGITS_POSITIONS} {keep} outside 1.."
                f"{SEQUENCE} {seq}"
            )
    return problems
