"""Caches of the torch-free runtime: per-image cross-attention K/V and few-shot prefix states.

Few-shot prompts repeat the same demonstrations for every query. Their image K/V and their
decoder KV cache depend only on the demonstrations (tokens before the query, images before the
query), never on the query or the search settings, so they are computed once and reused:

* `VisionCache`: K/V of one image keyed by the sha256 of its *preprocessed* pixels (so the same
  picture passed as a path, bytes or array hits, and a change of preprocessing misses).
* `PixelMemo`: preprocessed pixels and their hash keyed by the file or bytes they came from, so
  an image given again (every demonstration of a few-shot evaluation) is decoded once.
* `PrefixCache`: `PrefixState` snapshots (past KV, images used so far) keyed by the prefix
  token ids and the pixel hashes of its images. A lookup returns the longest usable prefix of a
  request: token-for-token and image-for-image equal. KV at position t depends only on tokens
  <= t and the images they attend to, so a snapshot truncated to any shorter matching length is
  still exact.

Both are LRUs bounded by entries and bytes; numpy only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

__all__ = [
    "LRUCache",
    "PixelMemo",
    "PrefixCache",
    "PrefixState",
    "VisionCache",
    "pixel_digest",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ImageKV = dict[str, np.ndarray]  # cross_attn.{j}.key|value -> (H, latents, Dh) of one image


def pixel_digest(pixels: np.ndarray) -> str:
    """Content hash of one preprocessed image (dtype and shape included)."""
    h = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


class LRUCache(Generic[K, V]):
    """Least-recently-used map bounded by entry count and total bytes, with hit/miss counters.

    An entry larger than `max_bytes` is not stored (it would evict everything and still not fit).
    """

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        if max_entries is not None and max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: K) -> V | None:
        """The value (marked most recently used, counted as a hit) or None (a miss)."""
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return item[0]

    def peek(self, key: K) -> V | None:
        """The value (marked most recently used) or None, without counting a hit or miss."""
        item = self._data.get(key)
        if item is None:
            return None
        self._data.move_to_end(key)
        return item[0]

    def touch(self, key: K) -> None:
        if key in self._data:
            self._data.move_to_end(key)

    def values(self) -> Iterator[V]:
        """Values from least to most recently used, without touching the order."""
        return (v for v, _ in list(self._data.values()))

    def put(self, key: K, value: V, nbytes: int) -> bool:
        """Insert (or replace) as most recently used; evict the oldest to fit. False if too big."""
        if key in self._data:
            self.bytes -= self._data.pop(key)[1]
        if (self.max_bytes is not None and nbytes > self.max_bytes) or self.max_entries == 0:
            return False
        self._data[key] = (value, nbytes)
        self.bytes += nbytes
        while (self.max_entries is not None and len(self._data) > self.max_entries) or (
            self.max_bytes is not None and self.bytes > self.max_bytes
        ):
            _, (_, size) = self._data.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
        return True

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        self._data.clear()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._data),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
        }


class VisionCache(LRUCache[str, ImageKV]):
    """Per-image cross-attention K/V keyed by `pixel_digest`, bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_entries=None, max_bytes=max_bytes)

    def add(self, digest: str, kv: ImageKV) -> None:
        self.put(digest, kv, sum(a.nbytes for a in kv.values()))


class PixelMemo(LRUCache[tuple, tuple[np.ndarray, str]]):
    """Preprocessed pixels and their `pixel_digest` keyed by `runtime.images.source_key` (a
    file's identity and times, or the sha256 of encoded bytes), bounded by bytes: an image
    given again skips decoding, resizing and hashing. The key includes nothing of the
    preprocessing, so a memo serves one `PreprocessConfig`."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_entries=None, max_bytes=max_bytes)

    def add(self, key: tuple, pixels: np.ndarray, digest: str) -> None:
        pixels.setflags(write=False)  # shared by every prompt that gives this image again
        self.put(key, (pixels, digest), pixels.nbytes)


@dataclass(frozen=True)
class PrefixState:
    """Decoder state after a prompt prefix, computed alone (batch 1, no padding).

    `past` holds (1, kv_heads, len(tokens), head_dim) arrays per `past_key_values.*` name;
    `image_kv` the K/V of the prefix's images in prompt order (their count is the media count).
    Arrays are never written after creation; runs read them as inputs only.
    """

    tokens: np.ndarray  # (P,) int64
    image_hashes: tuple[str, ...]
    past: dict[str, np.ndarray]
    image_kv: tuple[ImageKV, ...]

    @property
    def key(self) -> tuple[bytes, tuple[str, ...]]:
        return self.tokens.tobytes(), self.image_hashes

    @property
    def nbytes(self) -> int:
        # image K/V are usually shared with the vision cache; count them anyway (upper bound)
        kv = sum(a.nbytes for d in self.image_kv for a in d.values())
        return sum(a.nbytes for a in self.past.values()) + kv + self.tokens.nbytes

    def past_prefix(self, length: int) -> dict[str, np.ndarray]:
        """Past KV of the first `length` tokens (the stored arrays themselves when complete)."""
        if length == len(self.tokens):
            return self.past
        return {k: np.ascontiguousarray(v[:, :, :length]) for k, v in self.past.items()}


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """LRU of `PrefixState`s with longest-usable-prefix lookup."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.lru: LRUCache[tuple[bytes, tuple[str, ...]], PrefixState] = LRUCache(
            max_entries, max_bytes
        )

    def lookup(
        self,
        tokens: np.ndarray,
        image_hashes: Sequence[str],
        media_positions: np.ndarray,
        boundaries: np.ndarray,
    ) -> tuple[PrefixState | None, int]:
        """Best state and how many leading request tokens it covers (0: nothing usable).

        `media_positions[i]` is the token index of the request's image i; `boundaries` (sorted)
        the lengths at which a reused prefix may end: after a demonstration, so a shared `<s>`
        or a half-equal demonstration is not counted as a hit. A state is usable up to the
        first differing token, and, if an image differs, only up to that image's marker (tokens
        before it never attend to it), then down to the last boundary.
        """
        best: PrefixState | None = None
        best_len = 0
        for state in self.lru.values():
            length = _common_prefix(state.tokens, tokens)
            n_images = int(np.searchsorted(media_positions, length))  # markers before `length`
            for i in range(n_images):
                if state.image_hashes[i] != image_hashes[i]:
                    length = int(media_positions[i])
                    break
            usable = int(np.searchsorted(boundaries, length, side="right"))
            length = int(boundaries[usable - 1]) if usable else 0
            if length > best_len:
                best, best_len = state, length
        if best is None:
            self.lru.misses += 1
        else:
            self.lru.hits += 1
            self.lru.touch(best.key)
        return best, best_len

    def exact(self, tokens: np.ndarray, image_hashes: Sequence[str]) -> PrefixState | None:
        """The state stored for exactly this prefix, if any (not counted as a lookup)."""
        return self.lru.peek((tokens.tobytes(), tuple(image_hashes)))

    def store(self, state: PrefixState) -> None:
        self.lru.put(state.key, state, state.nbytes)

    def clear(self) -> None:
        self.lru.clear()

    def stats(self) -> dict[str, Any]:
        return self.lru.stats()
