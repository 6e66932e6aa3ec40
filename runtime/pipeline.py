"""Prompt in, text out: tokenizer + image preprocessing + the two graphs + the shared search.

Torch-free (numpy, onnxruntime, tokenizers, Pillow). One request is a batch of prompts with
`<image>` markers and their media, left-padded into one decoder batch. A media item is an image
or a video clip (`runtime.video.Video`), mixed freely: each fills one `<image>` marker, in the
order given; a clip's frames are sampled and preprocessed like images (runtime/video.py).

Few-shot prompts repeat their demonstrations, so their work is cached (runtime/cache.py):
* image K/V per preprocessed-pixel hash (vision cache; a clip's key covers all its frames);
* the decoder state after the demonstrations (prefix cache). A prompt is prefilled in two parts,
  split after its last `<|endofchunk|>` (the end of the demonstrations): the prefix alone, batch
  1, with only the prefix's images, snapshotted; then the rest. A later prompt reuses the longest
  cached prefix that matches token-for-token and image-for-image and prefills only the rest.
A snapshot depends on nothing but its tokens and images (never on the query, the batch or the
search settings), which is what makes reuse exact. Results with and without caches agree to
float rounding (the split prefill sums in a different order): same tokens, log-probs within 1e-5.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .cache import ImageKV, PixelMemo, PrefixCache, PrefixState, VisionCache, pixel_digest
from .contracts import DecoderStepModel, Engine
from .decoding import count_is_media_state, media_reset_token
from .engine import DEFAULT_PROVIDERS, OnnxFlamingo
from .generation import GenerationConfig, GenerationResult, ShouldStop, generate
from .idefics import IdeficsPromptFormat, few_shot_end_of_chunk, idefics_text
from .images import (
    ImageError,
    ImageInput,
    PreprocessConfig,
    image_list,
    preprocess_one,
    source_key,
)
from .prompts import (
    Demonstration,
    Task,
    build_few_shot_prompt,
    check_images_match,
    check_text,
)
from .spec import cross_attn_names, trained_context
from .tokenizer import ExportTokenizer, load_export_tokenizer, stable_text
from .video import Video, encode_media, preprocess_clip

MediaInput = ImageInput | Video  # an image, or a clip of frames

OnToken = Callable[[int, int], None]


@dataclass
class Generation:
    """One prompt's continuation. `timings_ms` are the whole request's (shared by a batch):
    vision (preprocess + hash + vision graph), prefill (prompt up to its first logits, cached
    prefixes excluded), decode (the rest), total. `stats` are this prompt's counts.

    Beam search: `score` is the sequence's length-normalised score (HF `sequences_scores`).
    With `num_return_sequences` n > 1, `generate` returns the best sequence with the next
    n - 1 in `alternatives`, best first; `generate_batch` returns all n per prompt (HF's
    layout) and leaves `alternatives` empty.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    timings_ms: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    score: float | None = None
    alternatives: list[Generation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": self.text,
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "timings_ms": self.timings_ms,
            "stats": self.stats,
        }
        if self.score is not None:
            out["score"] = self.score
        if self.alternatives:
            out["alternatives"] = [
                {"text": a.text, "token_ids": a.token_ids, "logprobs": a.logprobs, "score": a.score}
                for a in self.alternatives
            ]
        return out


@dataclass
class _Row:
    """Per-prompt bookkeeping of one request."""

    ids: np.ndarray  # (L,) int64
    media_positions: np.ndarray  # token index of each image's marker
    pixels: list[np.ndarray]  # per media item (F, 3, S, S); images F = 1
    hashes: list[str]
    boundaries: np.ndarray  # prefix lengths that end a demonstration (after <|endofchunk|>)
    # (L + 1,) whether a split at p restarts exactly from the image count (runtime.decoding.
    # count_is_media_state: all True but under IDEFICS' rule)
    resumable: np.ndarray
    image_kv: list[ImageKV | None] = field(default_factory=list)
    state: PrefixState | None = None
    cached: int = 0  # leading tokens whose KV `state` holds (usable by the batch)
    reused: int = 0  # of those, found in the cache (not computed by this request)

    @property
    def split(self) -> int:
        """Where the prompt is split for caching: after its last demonstration."""
        return int(self.boundaries[-1]) if len(self.boundaries) else 0

    def images_before(self, length: int) -> int:
        return int(np.searchsorted(self.media_positions, length))


class TextStream:
    """Incremental detokenizer for streaming: the pieces add up to `Generation.text`.

    Byte-level BPE splits multi-byte characters over tokens; decoding a partial sequence ends in
    U+FFFD, so text is held back until the character is complete. A tokenizer that cleans up
    tokenization spaces (" ." -> ".", runtime.tokenizer) has its text held back from the last
    space a later token's clean-up could still change.
    """

    def __init__(
        self, tokenizer: ExportTokenizer | Tokenizer, skip_ids: Sequence[int] = ()
    ) -> None:
        self.tokenizer = (
            tokenizer if isinstance(tokenizer, ExportTokenizer) else ExportTokenizer(tokenizer)
        )
        self.skip_ids = set(skip_ids)
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        raw = self.tokenizer.decode(self.ids, clean_up_tokenization_spaces=False)
        if raw.endswith("\ufffd"):
            return ""
        return self._emit(stable_text(raw, self.tokenizer.clean_up_tokenization_spaces))

    def flush(self) -> str:
        """Whatever is left (incomplete bytes included) at the end of generation."""
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        if len(text) <= self.emitted:
            return ""
        new = text[self.emitted :]
        self.emitted = len(text)
        return new


class FlamingoPipeline:
    """An export folder ready for few-shot generation, with vision and prefix caches."""

    def __init__(
        self,
        export_dir: str | Path,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int | None = None,
        *,
        prefix_cache: bool = True,
        vision_cache: bool = True,
        prefix_cache_entries: int = 8,
        prefix_cache_bytes: int = 1 << 30,
        vision_cache_bytes: int = 256 << 20,
        pixel_memo_bytes: int = 64 << 20,
        io_binding: bool = True,
        engine: Engine | None = None,
        allow_spinning: bool = True,
    ) -> None:
        """`allow_spinning=False`: no graph's idle onnxruntime workers spin (onnxruntime's
        `session.intra_op.allow_spinning`; for loaded or shared machines, runtime.engine).
        `engine` replaces the onnxruntime engine (e.g. trt.engine.TrtFlamingo): any
        runtime.contracts.Engine; its `limits` bound the prompts (the export's or lower).
        `pixel_memo_bytes` bounds the preprocessed pixels kept per image file or bytes
        (runtime.cache.PixelMemo; 0 turns it off). A setting of the wrong type is a
        ValueError naming it (a string such as 'false' would otherwise read as true)."""
        switches = {"prefix_cache": prefix_cache, "vision_cache": vision_cache,
                    "io_binding": io_binding, "allow_spinning": allow_spinning}  # fmt: skip
        for name, value in switches.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        sizes = {"prefix_cache_entries": prefix_cache_entries,
                 "prefix_cache_bytes": prefix_cache_bytes,
                 "vision_cache_bytes": vision_cache_bytes,
                 "pixel_memo_bytes": pixel_memo_bytes}  # fmt: skip
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.engine: Engine = (
            engine
            if engine is not None
            else OnnxFlamingo(export_dir, providers, threads, spin=allow_spinning)
        )
        for note in self.engine.performance_notes():
            warnings.warn(f"{export_dir}: {note}", RuntimeWarning, stacklevel=2)
        self.tokenizer = load_export_tokenizer(self.engine.root, self.engine.manifest)
        self.preprocess_config = PreprocessConfig.from_dict(self.engine.manifest.preprocess)
        prompt = self.engine.manifest.prompt
        self.idefics_prompt = IdeficsPromptFormat.from_dict(prompt) if prompt else None
        # what ends a few-shot demonstration (runtime.idefics for IDEFICS)
        self.end_of_chunk = few_shot_end_of_chunk(prompt)
        self._media_reset = media_reset_token(self.engine.manifest.model)
        self._fake_image_id = (
            self.tokenizer.token_to_id(self.idefics_prompt.fake_image_token)
            if self.idefics_prompt is not None
            else None
        )
        # where generation stops by default: <|endofchunk|> (OpenFlamingo), </s> (IDEFICS) and
        # -instruct's <end_of_utterance> (the exit condition of its model card's generate call)
        end_of_utterance = self.idefics_prompt and self.idefics_prompt.end_of_utterance_token
        self._extra_stops: tuple[int, ...] = (
            (int(self.tokenizer.token_to_id(end_of_utterance)),) if end_of_utterance else ()
        )
        self.max_seq_len, self._context = self._context_limit()
        self.max_images = self.engine.limits["max_images"]
        self.max_frames = self.engine.limits["max_frames"]
        self.use_prefix_cache = prefix_cache
        self.use_vision_cache = vision_cache
        self.io_binding = io_binding
        self.prefix_cache = PrefixCache(prefix_cache_entries, prefix_cache_bytes)
        self.vision_cache = VisionCache(vision_cache_bytes)
        self.pixel_memo = PixelMemo(pixel_memo_bytes)
        dims = self.engine.dims
        self._xattn_names = [n for j in dims.xattn_layers for n in cross_attn_names(j)]

    # ------------------------------------------------------------------ public API

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Where generation stops by default: the engine's end of chunk (`<|endofchunk|>`;
        IDEFICS: `</s>`), and -instruct's `<end_of_utterance>`."""
        return (self.engine.eoc_token_id, *self._extra_stops)

    def default_config(self, **kw: Any) -> GenerationConfig:
        """GenerationConfig stopping at `stop_token_ids` (`<|endofchunk|>`; IDEFICS: `</s>`,
        and -instruct's `<end_of_utterance>`), padding with the export's pad id."""
        kw.setdefault("eos_token_ids", self.stop_token_ids)
        kw.setdefault("pad_token_id", self.engine.pad_token_id)
        return GenerationConfig(**kw)

    def generate(
        self,
        prompt: str,
        images: Sequence[MediaInput],
        config: GenerationConfig | None = None,
        on_token: OnToken | None = None,
        should_stop: ShouldStop | None = None,
        *,
        seed: int | None = None,
    ) -> Generation:
        """Greedy/beam/sampled continuation of an interleaved prompt (OpenFlamingo semantics).
        `images`: one media item per `<image>` marker, in order: an image, or a clip
        (`runtime.video.Video`; its frames: the clip's `num_frames`, else the export's
        max_frames).

        `on_token(0, token_id)` streams tokens (greedy/sampling: as chosen; beams: at the end);
        `should_stop(0)` -> True ends the generation early (runtime.generation.generate).
        `seed` (sampling) overrides `config.seed`.
        """
        seeds = None if seed is None else [seed]
        best, *others = self.generate_batch(
            [prompt], [images], config, on_token, should_stop, seeds=seeds
        )
        best.alternatives = others
        return best

    def generate_batch(
        self,
        prompts: Sequence[str],
        images_per_prompt: Sequence[Sequence[MediaInput]],
        config: GenerationConfig | None = None,
        on_token: OnToken | None = None,
        should_stop: ShouldStop | None = None,
        *,
        seeds: Sequence[int | None] | None = None,
    ) -> list[Generation]:
        """Several prompts in one left-padded decoder batch: one Generation per prompt, or with
        `num_return_sequences` n > 1 (beam search) n per prompt, best first, prompt-major (HF
        `generate`'s layout: Generation i * n + j is sequence j of prompt i); each row gets
        what it would get alone (to float rounding), sampled rows included: every row
        draws from its own random stream, seeded by `seeds[i]` (default `config.seed`). Rows
        with fewer images get zero K/V slots no token attends to. Unset eos / pad ids in
        `config` are the export's (`<|endofchunk|>` and its pad id).

        `on_token(row, token_id)`: greedy/sampling stream as tokens are chosen; beam search
        calls it after the search for every returned sequence, `row = i * n + j` for sequence j
        of prompt i (n = num_return_sequences). `should_stop(row)` -> True finishes that row
        early (e.g. its client disconnected).
        """
        if isinstance(prompts, str):
            raise ValueError("generate_batch takes a list of prompts; use generate for one")
        for name, value in (("prompts", prompts), ("images_per_prompt", images_per_prompt)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError(
                    f"{name} must be a list (one entry per prompt), got {type(value).__name__}"
                )
        prompts, images_per_prompt = list(prompts), list(images_per_prompt)
        if len(prompts) != len(images_per_prompt):
            raise ValueError(
                f"{len(prompts)} prompts but {len(images_per_prompt)} image lists were given"
            )
        if not prompts:
            raise ValueError("no prompts given")
        config = self._resolve(config)
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        start = time.perf_counter()
        rows = [
            self._prepare(prompt, images, config, f"prompt #{i}: " if len(prompts) > 1 else "")
            for i, (prompt, images) in enumerate(zip(prompts, images_per_prompt))
        ]
        if self.use_prefix_cache:
            for row in rows:
                row.state, row.reused = self.prefix_cache.lookup(
                    row.ids, row.hashes, row.media_positions, row.boundaries
                )
                row.cached = row.reused
        self._encode_missing_images(rows)
        vision_end = time.perf_counter()
        if self.use_prefix_cache:
            for row in rows:
                self._extend_prefix(row)
        result, step_model, cached = self._decode_batch(rows, config, on_token, should_stop, seeds)
        end = time.perf_counter()
        prefill_end = step_model.prefill_end or end
        timings = {
            "vision": (vision_end - start) * 1e3,
            "prefill": (prefill_end - vision_end) * 1e3,
            "decode": (end - prefill_end) * 1e3,
            "total": (end - start) * 1e3,
        }
        n_ret = config.num_return_sequences if config.num_beams > 1 else 1
        out = []
        for b, row in enumerate(rows):
            for k in range(b * n_ret, (b + 1) * n_ret):
                tokens = result.sequences[k]
                text_ids = [t for t in tokens if t not in (config.eos_token_ids or ())]
                stats = {
                    "prompt_tokens": len(row.ids),
                    "cached_tokens": cached[b],
                    "new_tokens": len(tokens),
                    "images": len(row.hashes),
                    "batch_size": len(rows),
                }
                out.append(
                    Generation(
                        text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                        token_ids=tokens,
                        logprobs=result.logprobs[k],
                        timings_ms=dict(timings),
                        stats=stats,
                        score=result.scores[k] if result.scores is not None else None,
                    )
                )
        return out

    def few_shot(
        self,
        demos: Sequence[Demonstration],
        query_image: MediaInput,
        task: Task = "caption",
        question: str | None = None,
        config: GenerationConfig | None = None,
        on_token: OnToken | None = None,
        *,
        seed: int | None = None,
    ) -> Generation:
        """OpenFlamingo few-shot query: demonstrations (cached after the first call) + query.
        IDEFICS: the demonstrations end with its own marker (`few_shot_prompt`), and the prompt
        is then built as IdeficsProcessor builds it (runtime.idefics)."""
        prompt, images = self.few_shot_prompt(demos, question, task, query_image)
        return self.generate(prompt, images, config, on_token, seed=seed)

    def few_shot_prompt(
        self,
        demos: Sequence[Demonstration],
        question: str | None = None,
        task: Task = "caption",
        query_image: MediaInput | None = None,
    ) -> tuple[str, list[MediaInput]]:
        """`runtime.prompts.build_few_shot_prompt` with this export's end of a demonstration
        (`end_of_chunk`): what `run --demos`, `few_shot`, the server and `bench` send."""
        return build_few_shot_prompt(
            demos, question, task, query_image=query_image, end_of_chunk=self.end_of_chunk
        )

    def clear_caches(self) -> None:
        """Drop cached prefixes, image K/V and preprocessed pixels (and reset their counters)."""
        self.prefix_cache.clear()
        self.vision_cache.clear()
        self.pixel_memo.clear()

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        """Entries, bytes, hits, misses, evictions of the prefix, vision and pixel caches."""
        return {
            "prefix": self.prefix_cache.stats(),
            "vision": self.vision_cache.stats(),
            "pixels": self.pixel_memo.stats(),
        }

    # ------------------------------------------------------------------ steps

    def _context_limit(self) -> tuple[int, str]:
        """The most tokens per row, prompt + new: the engine's max_seq_len, or the LM's own
        trained positions when fewer (a rotary LM never saw later positions; an ALiBi one
        extrapolates, and its export's limit stands), and where that number comes from."""
        limit = int(self.engine.limits["max_seq_len"])
        trained, extrapolates = trained_context(self.engine.manifest.model)
        if trained is not None and trained < limit and not extrapolates:
            return trained, (
                f"the language model's max_position_embeddings; this export allows {limit}"
            )
        return limit, "this export's max_seq_len"

    def _resolve(self, config: GenerationConfig | None) -> GenerationConfig:
        """`config` checked, unset eos / pad filled in with the export's, ids in the vocab."""
        if config is None:
            config = GenerationConfig()
        elif not isinstance(config, GenerationConfig):
            raise ValueError(
                f"config must be a runtime.generation.GenerationConfig, got {type(config).__name__}"
            )
        config = config.with_model_defaults(self.stop_token_ids, self.engine.pad_token_id)
        vocab = self.engine.dims.vocab_size
        for name, ids in (
            ("eos_token_ids", config.eos_token_ids),
            ("pad_token_id", [config.pad_token_id]),
        ):
            outside = [t for t in ids or () if t >= vocab]
            if outside:
                raise ValueError(
                    f"{name} {outside} outside this export's vocabulary of {vocab} tokens"
                )
        return config

    def _prepare(
        self, prompt: str, images: Sequence[MediaInput], config: GenerationConfig, where: str
    ) -> _Row:
        """Validate, tokenize, preprocess and hash one prompt (no state is touched)."""
        if not isinstance(prompt, str):
            raise ValueError(f"{where}the prompt must be a str, got {type(prompt).__name__}")
        check_text(prompt, f"{where}the prompt")
        if not prompt.strip():
            raise ValueError(f"{where}the prompt is empty")
        try:
            images = image_list(images, allow_empty=True)
        except ImageError as e:
            raise ImageError(f"{where}images: {e}") from None
        try:
            check_images_match(prompt, len(images))
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        if len(images) > self.max_images:
            raise ValueError(
                f"{where}{len(images)} images exceed this export's limit of {self.max_images}"
            )
        ids = self.token_ids(prompt)
        total = len(ids) + config.max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(
                f"{where}prompt of {len(ids)} tokens + {config.max_new_tokens} new tokens = "
                f"{total} exceeds the maximum context of {self.max_seq_len} tokens "
                f"({self._context})"
            )
        if len(ids) == 0:
            raise ValueError(f"{where}the prompt is empty (no tokens)")
        media = self.engine.media_token_id
        media_positions = np.flatnonzero(ids == media)
        if len(media_positions) != len(images):  # markers the tokenizer did not keep whole
            raise ValueError(
                f"{where}the tokenizer found {len(media_positions)} <image> tokens for "
                f"{len(images)} images"
            )
        try:
            pixels, hashes = self._pixels(images)
        except ImageError as e:  # VideoError stays a VideoError
            raise type(e)(f"{where}{e}") from None
        # a split needs a token after it: the first step must have something to run
        resumable = count_is_media_state(ids, self.engine.media_token_id, self._media_reset)
        if self.idefics_prompt is None:
            boundaries = np.flatnonzero(ids[:-1] == self.engine.eoc_token_id) + 1
        else:
            # IDEFICS: before each image group that starts a demonstration (or the query), where
            # the image count alone is the media state (runtime.decoding.count_is_media_state)
            starts = np.flatnonzero((ids[:-2] == self._fake_image_id) & (ids[1:-1] == media))
            boundaries = starts[(starts > 0) & resumable[starts]]
        return _Row(
            ids, media_positions, pixels, hashes, boundaries, resumable, [None] * len(images)
        )

    def _pixels(self, images: list[Any]) -> tuple[list[np.ndarray], list[str]]:
        """Each media item's preprocessed frames (F, 3, S, S) (an image: F = 1) and their
        digests (a clip's covers all its frames); images from the pixel memo when the same
        file or bytes came before."""
        pixels, hashes = [], []
        for i, item in enumerate(images):
            if isinstance(item, Video):  # frames read and sampled anew (no memo)
                frames = preprocess_clip(item, self.preprocess_config, self.max_frames, i)
                pixels.append(frames)
                hashes.append(pixel_digest(frames))
                continue
            key = source_key(item) if self.pixel_memo.max_bytes else None
            known = self.pixel_memo.get(key) if key is not None else None
            if known is None:
                one = preprocess_one(item, self.preprocess_config, f"image #{i}")[None]
                known = (one, pixel_digest(one))
                if key is not None:
                    self.pixel_memo.add(key, *known)
            pixels.append(known[0])
            hashes.append(known[1])
        return pixels, hashes

    def token_ids(self, prompt: str) -> np.ndarray:
        """OpenFlamingo: the prompt as the tokenizer reads it; IDEFICS: the text
        IdeficsProcessor builds from it, without added special tokens (runtime.idefics)."""
        if self.idefics_prompt is None:
            return np.array(self.tokenizer.encode(prompt).ids, dtype=np.int64)
        text = idefics_text(prompt, self.idefics_prompt)
        return np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int64)

    def _encode_missing_images(self, rows: list[_Row]) -> None:
        """Fill every row's image K/V: from its prefix state, the vision cache, or one vision
        run over the distinct missing images."""
        missing: dict[str, np.ndarray] = {}
        for row in rows:
            from_state = row.images_before(row.cached) if row.state is not None else 0
            for i in range(len(row.hashes)):
                if i < from_state:
                    row.image_kv[i] = row.state.image_kv[i]  # type: ignore[union-attr]
                    continue
                digest = row.hashes[i]
                kv = self.vision_cache.get(digest) if self.use_vision_cache else None
                if kv is not None:
                    row.image_kv[i] = kv
                elif digest not in missing:
                    missing[digest] = row.pixels[i]  # type: ignore[index]
        if not missing:
            return
        features = encode_media(self.engine.encode_images, list(missing.values()))
        computed = {
            digest: {n: features[n][k].copy() for n in self._xattn_names}
            for k, digest in enumerate(missing)
        }
        if self.use_vision_cache:
            for digest, kv in computed.items():
                self.vision_cache.add(digest, kv)
        for row in rows:
            for i, digest in enumerate(row.hashes):
                if row.image_kv[i] is None:
                    row.image_kv[i] = computed[digest]

    def _extend_prefix(self, row: _Row) -> None:
        """Make sure the row's own prefix (up to `split`) is a cached state: compute it alone
        from the best cached state (or from scratch) and store it."""
        if row.split <= row.cached:
            return
        tokens = row.ids[: row.split]
        n_images = row.images_before(row.split)
        hashes = tuple(row.hashes[:n_images])
        done = self.prefix_cache.exact(tokens, hashes)  # an earlier row of this batch made it
        if done is not None:
            row.state, row.cached = done, row.split
            return
        image_kv = tuple(row.image_kv[:n_images])  # type: ignore[arg-type]
        past = row.state.past_prefix(row.cached) if row.state is not None else None
        model = self.engine.step_model(
            self._cross_kv([list(image_kv)]),
            np.array([n_images]),
            past=past,
            media_count=np.array([row.images_before(row.cached)]),
            io_binding=self.io_binding,
        )
        model.advance(tokens[None, row.cached :], np.ones((1, row.split), dtype=np.int64))
        row.state = PrefixState(tokens.copy(), hashes, model.past_arrays(), image_kv)
        row.cached = row.split
        self.prefix_cache.store(row.state)

    def _decode_batch(
        self,
        rows: list[_Row],
        config: GenerationConfig,
        on_token: OnToken | None,
        should_stop: ShouldStop | None = None,
        seeds: Sequence[int | None] | None = None,
    ) -> tuple[GenerationResult, DecoderStepModel, list[int]]:
        """Left-pad the rows, start the decoder from their cached states, run the search.

        Row b is [pads_b][prompt_b]; the common past length S is the largest every row can
        take from its state (pads count as cached: zero K/V under mask 0), at most L-1 so each
        row has a new token. Returns the search result, the step model, the reused tokens.
        """
        lengths = [len(r.ids) for r in rows]
        total = max(lengths)
        pads = [total - n for n in lengths]
        past_len = min(min(p + r.cached for p, r in zip(pads, rows)), total - 1)
        # a shorter batch split must still restart every row exactly (IDEFICS: no EOS after
        # its last image before the split); 0 always does
        while past_len > 0 and not all(
            r.resumable[max(0, past_len - p)] for p, r in zip(pads, rows)
        ):
            past_len -= 1
        ids = np.full((len(rows), total), self.engine.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, (row, pad) in enumerate(zip(rows, pads)):
            ids[b, pad:] = row.ids
            mask[b, pad:] = 1
        past = self._batch_past(rows, pads, past_len)
        media_count = [r.images_before(max(0, past_len - p)) for r, p in zip(rows, pads)]
        model = self.engine.step_model(
            self._cross_kv([r.image_kv for r in rows]),  # type: ignore[misc]
            np.array([len(r.hashes) for r in rows]),
            past=past,
            media_count=np.array(media_count),
            io_binding=self.io_binding,
        )
        result = generate(model, ids, mask, config, on_token, should_stop, seeds=seeds)
        reused = [min(r.reused, max(0, past_len - p)) for r, p in zip(rows, pads)]
        return result, model, reused

    def _batch_past(
        self, rows: list[_Row], pads: list[int], past_len: int
    ) -> dict[str, np.ndarray] | None:
        if past_len == 0:
            return None
        if len(rows) == 1:
            return rows[0].state.past_prefix(past_len)  # type: ignore[union-attr]
        dims = self.engine.dims
        shape = (len(rows), dims.num_kv_heads, past_len, dims.head_dim)
        past = {}
        for name in self.engine.decoder_spec.input_names:
            if not name.startswith("past_key_values."):
                continue
            buf = np.zeros(shape, dtype=self.engine.float_dtype)
            for b, (row, pad) in enumerate(zip(rows, pads)):
                if past_len > pad and row.state is not None:  # else: pads only (zeros, masked)
                    buf[b, :, pad:] = row.state.past[name][0, :, : past_len - pad]
            past[name] = buf
        return past

    def _cross_kv(self, rows: list[list[ImageKV]]) -> dict[str, np.ndarray]:
        """Per-row cross-attention K/V from each row's images' K/V (runtime.decoding)."""
        images = [kv for row in rows for kv in row]
        per_image = {name: [kv[name] for kv in images] for name in self._xattn_names}
        starts = np.cumsum([0] + [len(row) for row in rows])
        return self.engine.rows_cross_kv(
            per_image, [list(range(s, s + len(row))) for s, row in zip(starts, rows)]
        )
