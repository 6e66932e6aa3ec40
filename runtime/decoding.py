"""Per-step bookkeeping that every decoder backend shares (numpy only).

The media-location rule and the position ids are computed outside the graphs, once, here: the
PyTorch reference's step model and the onnxruntime/TensorRT sessions all call these, so the
backends can differ only in how they compute logits. `BaseStepModel` is the step models'
shared part (new-token counting, run/advance/step, reorder bookkeeping); `rows_cross_kv`
arranges image K/V per row for every engine and the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from .spec import ModelDims, cross_attn_names

# per K/V name, each image's K/V (H, L, Dh): the vision batch (N, H, L, Dh) or a list of them
ImageFeatures = Mapping[str, np.ndarray | Sequence[np.ndarray]]


def media_reset_token(model_cfg: dict) -> int | None:
    """The token after which no image is seen until the next `<image>` (IDEFICS' EOS), from a
    FlamingoConfig dict; None under OpenFlamingo's rule (runtime.spec.MEDIA_RULES)."""
    if model_cfg.get("media_rule", "openflamingo") == "idefics":
        return int(model_cfg["eos_token_id"])
    return None


class MediaCounter:
    """Which image each new token attends to, carried across prefill and decode steps.

    A token's media index is the 1-based number of the latest `<image>` at or before it
    (0 = before the first image: no cross-attention), counted with integer ops. Counting goes on
    across steps, so every generated token attends to the prompt's last image, as OpenFlamingo's
    cached-media generation does. Indices are capped at the row's image count so a generated
    `<image>` token keeps attending to the last real image instead of to nothing.

    With `reset_token_id` (IDEFICS, processing_idefics.image_attention_mask_for_packed_input_
    ids): tokens after that token (EOS) see no image until the next `<image>`; and once the
    prompt has run (`end_prompt`), every generated token keeps the prompt's last index, as
    IdeficsForVisionText2Text.generate repeats the last image_attention_mask row.
    """

    def __init__(
        self, media_token_id: int, num_images: np.ndarray, reset_token_id: int | None = None
    ) -> None:
        self.media_token_id = media_token_id
        self.reset_token_id = reset_token_id
        self.num_images = np.asarray(num_images, dtype=np.int64)
        self.count = np.zeros_like(self.num_images)
        self.blocked = np.zeros(self.num_images.shape, dtype=bool)  # a reset since the image
        self.last = np.zeros_like(self.num_images)  # the latest token's index
        self.frozen = False

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        if self.frozen:
            return np.repeat(self.last[:, None], input_ids.shape[1], axis=1)
        if input_ids.shape[1] == 1 and self.reset_token_id is None:  # a decode step
            is_image = input_ids[:, 0] == self.media_token_id
            index = np.minimum(self.count + is_image, self.num_images)
            self.count = self.last = index
            return index[:, None]
        is_image = input_ids == self.media_token_id
        step = np.cumsum(is_image, axis=-1, dtype=np.int64)
        index = np.minimum(self.count[:, None] + step, self.num_images[:, None])
        self.count = index[:, -1].copy()
        if self.reset_token_id is not None:
            pos = np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape)
            last_image = np.maximum.accumulate(np.where(is_image, pos, -1), axis=-1)
            last_reset = np.maximum.accumulate(
                np.where(input_ids == self.reset_token_id, pos, -1), axis=-1
            )
            before = np.concatenate([np.full_like(last_reset[:, :1], -1), last_reset[:, :-1]], 1)
            blocked = (before > last_image) | (self.blocked[:, None] & (last_image < 0))
            index = np.where(blocked, 0, index)
            self.blocked = (last_reset[:, -1] > last_image[:, -1]) | (
                self.blocked & (last_image[:, -1] < 0)
            )
        self.last = index[:, -1].copy()
        return index

    @property
    def steady(self) -> bool:
        """Whether a token that is not an `<image>` leaves this state (and its index) as it
        is: always under OpenFlamingo's rule (the count only moves at an `<image>`; `last` is
        the count), under IDEFICS' once the prompt has run (`frozen`)."""
        return self.reset_token_id is None or self.frozen

    def end_prompt(self) -> None:
        """The prompt has run: under IDEFICS' rule, generated tokens keep its last index."""
        self.frozen = self.reset_token_id is not None

    def reorder(self, index: np.ndarray) -> None:
        self.count = self.count[index]
        self.num_images = self.num_images[index]
        self.blocked = self.blocked[index]
        self.last = self.last[index]


def count_is_media_state(
    ids: np.ndarray, media_token_id: int, reset_token_id: int | None = None
) -> np.ndarray:
    """(L + 1,) bool: whether MediaCounter's state after `ids[:p]` is its image count alone, so
    that a counter restarted at p with `count` = images before p indexes `ids[p:]` exactly as
    the full run does (a reused prefix then gives a full prefill's logits).

    Always, under OpenFlamingo's rule. Under IDEFICS' (`reset_token_id`, its EOS) the state is
    also "a reset since the last image": p qualifies unless an EOS follows the last `<image>`
    before p (with no image before p the count, 0, says all). tests/runtime/test_idefics.py
    checks both directions against the full run."""
    safe = np.ones(len(ids) + 1, dtype=bool)
    if reset_token_id is None or len(ids) == 0:
        return safe
    pos = np.arange(len(ids))
    last_image = np.maximum.accumulate(np.where(ids == media_token_id, pos, -1))
    last_reset = np.maximum.accumulate(np.where(ids == reset_token_id, pos, -1))
    safe[1:] = ~((last_reset > last_image) & (last_image >= 0))
    return safe


def in_graph_media_index(
    input_ids: np.ndarray, past_length: int, images: int, media_token_id: int
) -> np.ndarray:
    """The media index a decoder with in-graph indices (runtime.spec.DecoderForm) computes:
    clip(before + cumsum(ids == <image>), 0, images), with `images` the images in the
    cross-attention K/V fed (media_keys / num_latents) and before = 0 for a prefill from an
    empty cache, images - (<image> tokens in these ids) after one, so generated tokens attend to
    the last image (OpenFlamingo's cached-media generation). It equals `MediaCounter` for rows
    whose K/V hold exactly their own images and whose earlier images are all cached; not for
    rows padded to another row's image count, nor for text-only rows after the prefill, nor for
    IDEFICS's processor mask (a one-hot per token that no count of `<image>` tokens reproduces).
    exporter/decoder_forms.py builds the same rule from ONNX ops."""
    is_media = (input_ids == media_token_id).astype(np.int64)
    count = np.cumsum(is_media, axis=1)
    before = (images - is_media.sum(axis=1, keepdims=True)) if past_length > 0 else 0
    return np.clip(before + count, 0, images)


def position_ids(attention_mask: np.ndarray, num_new: int) -> np.ndarray:
    """HF's rule under left padding: cumsum(mask) - 1 with pads at 1; the last num_new columns."""
    if num_new == 1:  # a decode step: the last column alone, sum(mask) - 1 (one reduction)
        last = attention_mask[:, -1:]
        return np.where(last != 0, attention_mask.sum(axis=-1, keepdims=True) - 1, 1)
    pos = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    pos[attention_mask == 0] = 1
    return pos[:, -num_new:]


def logits_index(num_new: int, all_positions: bool) -> np.ndarray:
    """The decoder's `logits_index`: every new position, or the last one only (generation
    reads nothing else; rows are left-padded, so the last column is every row's last token)."""
    if all_positions:
        return np.arange(num_new, dtype=np.int64)
    return np.array([num_new - 1], dtype=np.int64)


def current_image_offsets(
    media_index: np.ndarray, media_keys: int, num_latents: int
) -> np.ndarray | None:
    """Per row, the first key of the image every new token attends to, or None.

    Applies when every new token of a row attends to one image (each decode step; text after
    a row's last image): the other images' keys get exactly zero weight under the media mask,
    so attending to the current image's `num_latents` keys alone (media index 1, or 0 where a
    row has no image yet) computes the same outputs without reading and masking
    (images - 1) x num_latents keys per cross-attention layer and step. None where a row's new
    tokens span images (a prefill) or there is one image per row already.
    """
    if media_keys <= num_latents or not (media_index == media_index[:, :1]).all():
        return None
    return np.maximum(media_index[:, 0] - 1, 0) * num_latents


def current_image_kv(
    cross_kv: dict[str, np.ndarray],
    offsets: Sequence[int],
    num_latents: int,
    rows: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Cross-attention K/V (B, H, num_latents, Dh) of each row's current image, from the
    rows' K/V and `current_image_offsets`; row b reads `cross_kv` row `rows[b]` (default b:
    beams of one prompt read their prompt's row, no per-beam copy)."""
    rows = range(len(offsets)) if rows is None else rows
    return {
        name: np.stack([kv[r, :, s : s + num_latents] for r, s in zip(rows, offsets)])
        for name, kv in cross_kv.items()
    }


def rows_cross_kv(
    features: ImageFeatures,
    rows: Sequence[Sequence[int]],
    dims: ModelDims,
    dtype: np.dtype,
) -> dict[str, np.ndarray]:
    """Per-row cross-attention K/V for the decoder (B, H, slots x num_latents, Dh): row b
    attends over images rows[b] (indices into `features[name]`: the vision batch (N, H, L, Dh)
    or a list of per-image (H, L, Dh)), concatenated in order and zero-padded to the longest
    row, at least one slot (text-only rows attend to nothing), in the decoder's dtype (the
    vision graph may run at another precision)."""
    most = max(1, max(len(r) for r in rows))
    latents = dims.num_latents
    shape = (len(rows), dims.xattn_heads, most * latents, dims.xattn_dim_head)
    out = {}
    for j in dims.xattn_layers:
        for name in cross_attn_names(j):
            buf = np.zeros(shape, dtype=dtype)
            for b, images in enumerate(rows):
                for slot, i in enumerate(images):
                    buf[b, :, slot * latents : (slot + 1) * latents] = features[name][i]
            out[name] = buf
    return out


class RowsCrossKV:
    """`rows_cross_kv` as a method of an engine that has `dims` and `float_dtype` (the
    onnxruntime and TensorRT engines both)."""

    dims: ModelDims
    float_dtype: np.dtype

    def rows_cross_kv(
        self, features: ImageFeatures, rows: Sequence[Sequence[int]]
    ) -> dict[str, np.ndarray]:
        """Per-row cross-attention K/V (see `rows_cross_kv`)."""
        return rows_cross_kv(features, rows, self.dims, self.float_dtype)


def _int64(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.int64)


class BaseStepModel:
    """What every decoder step model does the same way (runtime.contracts.DecoderStepModel).

    Here: the media count carried across calls, `step`'s new-token counting (leading ids
    already in the cache are skipped, so the search can pass the whole prompt over a cached
    prefix), `run`/`advance`/`step` over one forward, `prefill_end`, and the reorder
    bookkeeping (identity skipped, index checked, media counts and batch size moved). A backend
    implements `_forward` (run new tokens, return logits) and `_reorder` (move its cache rows),
    `past_length` and `past_arrays`.
    """

    def __init__(
        self,
        media_token_id: int,
        num_images: np.ndarray,
        media_count: np.ndarray | None = None,
        media_reset_token_id: int | None = None,
    ) -> None:
        """`media_count`: images each row has already seen (a cached prefix's);
        `media_reset_token_id`: IDEFICS' rule (MediaCounter, `media_reset_token`)."""
        self.media = MediaCounter(media_token_id, num_images, media_reset_token_id)
        if media_count is not None:
            self.media.count = np.asarray(media_count, dtype=np.int64).copy()
        self.batch = len(self.media.num_images)
        self.prefill_end: float | None = None  # perf_counter() after the first step

    # ------------------------------------------------------------------ backend

    @property
    def past_length(self) -> int:
        raise NotImplementedError

    def past_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, all_positions: bool
    ) -> np.ndarray:
        """Run new tokens (N, T) int64 under the mask (N, past + T) into the cache; logits
        (N, T, V), or (N, 1, V) of the last position unless `all_positions` (may be a view
        valid until the next call)."""
        raise NotImplementedError

    def _reorder(self, index: np.ndarray) -> None:
        """new_row[i] = row[index[i]] for the backend's cache (index checked, not identity)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def _new_tokens(
        self, input_ids: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) as int64 after checking they are (N, T) new tokens and (N, past + T)
        with N the cache's batch: ValueError naming the shapes otherwise (a wrong length would
        silently misplace the in-place cache's positions)."""
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if (
            ids.ndim != 2
            or mask.ndim != 2
            or ids.shape[0] != self.batch
            or mask.shape != (self.batch, self.past_length + ids.shape[1])
        ):
            raise ValueError(
                f"new ids {ids.shape} and attention mask {mask.shape} do not fit a cache of "
                f"{self.batch} row(s) x {self.past_length} positions: expected (N, T) ids and "
                "an (N, past + T) mask"
            )
        return _int64(ids), _int64(mask)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """All-position logits (N, T, V) for the new tokens; advances the cache."""
        logits = self._forward(*self._new_tokens(input_ids, attention_mask), all_positions=True)
        return np.array(logits, copy=True)

    def advance(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Run new tokens into the cache, computing the last position's logits only (a cached
        prefix's logits are never read)."""
        self._forward(*self._new_tokens(input_ids, attention_mask), all_positions=False)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """StepModel.step: float32 logits (N, V) of the last position. Leading ids already in
        the cache (the mask is longer than past + new by that many) are skipped, so a cached
        prefix is never recomputed."""
        mask = _int64(attention_mask)
        input_ids = np.asarray(input_ids)
        rows = self.batch
        if input_ids.ndim != 2 or mask.ndim != 2 or not len(input_ids) == len(mask) == rows:
            raise ValueError(
                f"ids {input_ids.shape} and attention mask {mask.shape}: expected (N, T) and "
                f"(N, L) with N = {self.batch}, the cache's rows"
            )
        new = mask.shape[1] - self.past_length
        if not 1 <= new <= input_ids.shape[1]:
            raise ValueError(
                f"attention mask of {mask.shape[1]} with {self.past_length} cached positions "
                f"leaves {new} new tokens, but {input_ids.shape[1]} ids were given"
            )
        ids = _int64(input_ids[:, -new:])
        logits = self._forward(ids, mask, all_positions=False)[:, -1].astype(np.float32)
        if self.prefill_end is None:
            self.prefill_end = time.perf_counter()
            self.media.end_prompt()  # later steps run generated tokens
        return logits

    def reorder_cache(self, index: np.ndarray) -> None:
        """StepModel.reorder_cache: new_row[i] = row[index[i]] (beam expansion and reorder)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(index) == self.batch and np.array_equal(index, np.arange(self.batch)):
            return
        if index.size and (index.min() < 0 or index.max() >= self.batch):
            raise ValueError(f"reorder index out of range for batch {self.batch}")
        self._reorder(index)
        self.media.reorder(index)
        self.batch = len(index)
