"""Prefix and vision caches, batching and IOBinding: every shortcut must give what the plain
path gives (same token ids, log-probs within 1e-5), and the caches must key and evict right."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.cache import LRUCache, PrefixCache, PrefixState, pixel_digest
from runtime.generation import GenerationConfig
from runtime.pipeline import FlamingoPipeline, Generation
from runtime.prompts import Demonstration, build_few_shot_prompt


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i in range(8):
        path = folder / f"{i}.png"
        size = (30 + 3 * i, 50 - 2 * i, 3)
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def pipelines(tiny_export: Callable) -> Callable:
    """pipelines(family) -> (cached pipeline, plain pipeline without caches), built once."""
    cache: dict[str, tuple[FlamingoPipeline, FlamingoPipeline]] = {}

    def get(family: str) -> tuple[FlamingoPipeline, FlamingoPipeline]:
        if family not in cache:
            export = tiny_export(family)
            plain = FlamingoPipeline(
                export, prefix_cache=False, vision_cache=False, pixel_memo_bytes=0
            )
            cache[family] = (FlamingoPipeline(export), plain)
        return cache[family]

    return get


def demos(pictures: list[str], captions: list[str]) -> list[Demonstration]:
    return [Demonstration(p, text=c) for p, c in zip(pictures, captions)]


def assert_same(got: Generation, want: Generation) -> None:
    assert got.token_ids == want.token_ids
    assert np.allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
    assert got.text == want.text


@pytest.mark.parametrize("family", ["llama", "mpt"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_caches_give_the_uncached_result(pipelines, pictures, family: str, num_beams: int) -> None:
    pipe, plain = pipelines(family)
    pipe.clear_caches()
    config = pipe.default_config(max_new_tokens=8, num_beams=num_beams)
    shots = demos(pictures[:4], ["a red square", "two dogs", "a cat on a mat", "blue sky"])
    other = shots[:2] + demos(pictures[6:8], ["a boat", "green grass"])  # shares 2 demos

    cold = pipe.few_shot(shots, pictures[4], config=config)
    assert cold.stats["cached_tokens"] == 0
    assert pipe.cache_stats()["prefix"]["entries"] == 1
    assert_same(cold, plain.few_shot(shots, pictures[4], config=config))

    warm = pipe.few_shot(shots, pictures[5], config=config)  # same demos, new query
    prompt, _ = build_few_shot_prompt(shots, query_image=pictures[5])
    prefix_tokens = len(pipe.tokenizer.encode(prompt.rsplit("<|endofchunk|>", 1)[0]).ids) + 1
    assert warm.stats["cached_tokens"] == prefix_tokens
    assert warm.stats["prompt_tokens"] > prefix_tokens
    assert_same(warm, plain.few_shot(shots, pictures[5], config=config))

    partial = pipe.few_shot(other, pictures[4], config=config)  # first 2 demos reused
    assert 0 < partial.stats["cached_tokens"] < prefix_tokens
    assert_same(partial, plain.few_shot(other, pictures[4], config=config))
    assert (
        pipe.few_shot(other, pictures[4], config=config).stats["cached_tokens"]
        > (partial.stats["cached_tokens"])
    )  # its own 4-demo prefix was stored

    vqa = [Demonstration(p, question="what?", answer=a) for p, a in zip(pictures[:3], "xyz")]
    for _ in range(2):
        got = pipe.few_shot(vqa, pictures[3], task="vqa", question="why?", config=config)
        want = plain.few_shot(vqa, pictures[3], task="vqa", question="why?", config=config)
        assert_same(got, want)
    stats = pipe.cache_stats()
    assert stats["prefix"]["hits"] >= 4 and stats["prefix"]["misses"] == 2
    assert stats["vision"]["hits"] > 0


def test_same_pixels_hit_whatever_the_input_form(pipelines, pictures) -> None:
    pipe, _ = pipelines("llama")
    pipe.clear_caches()
    config = pipe.default_config(max_new_tokens=2)
    path = pictures[0]
    as_bytes = Path(path).read_bytes()
    as_array = np.asarray(Image.open(path).convert("RGB"))
    for image in (path, as_bytes, as_array, Image.open(path)):
        pipe.generate("<image>Output:", [image], config)
    vision = pipe.cache_stats()["vision"]
    assert (vision["entries"], vision["misses"], vision["hits"]) == (1, 1, 3)
    # a different picture is a different key
    pipe.generate("<image>Output:", [pictures[1]], config)
    assert pipe.cache_stats()["vision"]["entries"] == 2
    pipe.clear_caches()
    assert pipe.cache_stats()["vision"]["entries"] == 0
    assert pipe.cache_stats()["prefix"]["entries"] == 0


def test_pixel_memo_keys_on_the_file_or_bytes(pipelines, pictures, tmp_path: Path) -> None:
    pipe, plain = pipelines("llama")
    pipe.clear_caches()
    config = pipe.default_config(max_new_tokens=3)
    path = pictures[2]
    for image in (path, path, Path(path).read_bytes(), Path(path).read_bytes()):
        assert_same(pipe.generate("<image>Output:", [image], config),
                    plain.generate("<image>Output:", [image], config))  # fmt: skip
    memo = pipe.cache_stats()["pixels"]
    assert (memo["entries"], memo["misses"], memo["hits"]) == (2, 2, 2)
    for image in (Image.open(path), np.asarray(Image.open(path).convert("RGB"))):
        pipe.generate("<image>Output:", [image], config)  # may change in place: never memoized
    assert pipe.cache_stats()["pixels"]["entries"] == 2
    assert plain.cache_stats()["pixels"]["entries"] == 0  # pixel_memo_bytes=0: off

    # a file rewritten in place with other pixels, same size, its modification time put back:
    # the change time still tells, and the answer is the new picture's
    rng = np.random.default_rng(11)
    moving = tmp_path / "moving.bmp"
    first, second = (rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2))
    Image.fromarray(first).save(moving)
    pipe.generate("<image>Output:", [str(moving)], config)
    before = moving.stat()
    Image.fromarray(second).save(moving)
    os.utime(moving, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert moving.stat().st_size == before.st_size
    assert_same(pipe.generate("<image>Output:", [str(moving)], config),
                plain.generate("<image>Output:", [second], config))  # fmt: skip


def test_eviction_and_limits_keep_results_exact(tiny_export, pipelines, pictures) -> None:
    _, plain = pipelines("llama")
    small = FlamingoPipeline(
        tiny_export("llama"), prefix_cache_entries=1, vision_cache_bytes=3 * 2**10
    )
    config = small.default_config(max_new_tokens=5)
    sets = [demos(pictures[:2], ["one", "two"]), demos(pictures[2:4], ["three", "four"])]
    for shots in sets + sets:  # each call evicts the other prefix
        assert_same(
            small.few_shot(shots, pictures[5], config=config),
            plain.few_shot(shots, pictures[5], config=config),
        )
    stats = small.cache_stats()
    assert stats["prefix"]["entries"] == 1 and stats["prefix"]["evictions"] == 3
    assert stats["prefix"]["hits"] == 0
    assert stats["vision"]["bytes"] <= 3 * 2**10  # one image's K/V is larger: nothing stored
    assert stats["vision"]["entries"] == 0


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_batch_equals_each_prompt_alone(pipelines, pictures, monkeypatch, family: str) -> None:
    pipe, plain = pipelines(family)
    pipe.clear_caches()
    shots = demos(pictures[:3], ["a red square", "two dogs", "a cat"])
    few, few_images = build_few_shot_prompt(shots, query_image=pictures[4])
    pipe.few_shot(shots, pictures[5])  # warm the prefix: row 0 starts from it
    prompts = [few, "<image>Output:", "just text, no image", "<image>A<image>B<image>C is"]
    images = [few_images, pictures[6:7], [], pictures[5:8]]
    for num_beams in (1, 3):
        config = pipe.default_config(max_new_tokens=6, num_beams=num_beams)
        batch = pipe.generate_batch(prompts, images, config)
        for got, prompt, imgs in zip(batch, prompts, images):
            assert_same(got, plain.generate(prompt, imgs, config))
            assert got.stats["batch_size"] == 4
        assert batch[0].stats["cached_tokens"] > 0
    # two rows with the same new demonstrations: their prefix is computed and stored once
    pipe.clear_caches()
    twins = [build_few_shot_prompt(shots[::-1], query_image=p) for p in pictures[6:8]]
    config = pipe.default_config(max_new_tokens=4)
    made = []
    monkeypatch.setattr(
        pipe.engine,
        "step_model",
        lambda *a, **k: made.append(1) or type(pipe.engine).step_model(pipe.engine, *a, **k),
    )
    batch = pipe.generate_batch([t[0] for t in twins], [t[1] for t in twins], config)
    assert len(made) == 2  # one prefix prefill, one batch
    assert pipe.cache_stats()["prefix"]["entries"] == 1
    for got, (prompt, imgs) in zip(batch, twins):
        assert_same(got, plain.generate(prompt, imgs, config))


def test_io_binding_is_identical_to_session_run(tiny_export, pictures) -> None:
    """Same decoder outputs, bit for bit, over prefill, decode steps and beam reorders."""
    from runtime.images import PreprocessConfig, preprocess

    pipe = FlamingoPipeline(tiny_export("mpt"), vision_cache=False, prefix_cache=False)
    engine = pipe.engine
    pixels = preprocess(pictures[:3], PreprocessConfig.from_dict(engine.manifest.preprocess))
    cross_kv = engine.rows_cross_kv(engine.encode_images(pixels), [[0, 1], [2]])
    ids = np.array([pipe.tokenizer.encode("<image>a<|endofchunk|><image>b c").ids] * 2)
    models = [engine.step_model(cross_kv, np.array([2, 1]), io_binding=b) for b in (True, False)]
    assert [m.uses_io_binding for m in models] == [True, False]
    mask = np.ones_like(ids)
    outs = [m.run(ids, mask) for m in models]
    assert np.array_equal(outs[0], outs[1])
    rng = np.random.default_rng(0)
    for step in range(8):
        if step == 1:  # expand to 3 beams per row, then reorder within each row
            index = np.repeat(np.arange(2), 3)
        else:
            index = np.concatenate([rng.integers(0, 3, 3), 3 + rng.integers(0, 3, 3)])
        if step:
            for m in models:
                m.reorder_cache(index)
        nxt = rng.integers(0, 300, (len(models[0].media.count), 1))
        mask = np.ones((nxt.shape[0], mask.shape[1] + 1), dtype=np.int64)
        outs = [m.step(nxt, mask) for m in models]
        assert np.array_equal(outs[0], outs[1])
        assert all(np.array_equal(models[0].past[k], models[1].past[k]) for k in models[0].past)
    config = GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_ids=(engine.eoc_token_id,))
    plain = FlamingoPipeline(tiny_export("mpt"), prefix_cache=False, io_binding=False)
    got = pipe.generate("<image>x<|endofchunk|><image>y", pictures[:2], config)
    want = plain.generate("<image>x<|endofchunk|><image>y", pictures[:2], config)
    assert (got.token_ids, got.logprobs) == (want.token_ids, want.logprobs)


def test_timings_and_stats(pipelines, pictures) -> None:
    pipe, _ = pipelines("llama")
    out = pipe.generate("<image>Output:", pictures[:1], pipe.default_config(max_new_tokens=4))
    assert set(out.timings_ms) == {"vision", "prefill", "decode", "total"}
    assert all(v >= 0 for v in out.timings_ms.values())
    parts = out.timings_ms["vision"] + out.timings_ms["prefill"] + out.timings_ms["decode"]
    assert parts == pytest.approx(out.timings_ms["total"], rel=1e-6)
    assert out.stats["new_tokens"] == len(out.token_ids)
    assert out.stats["prompt_tokens"] == len(pipe.tokenizer.encode("<image>Output:").ids)
    assert set(out.to_dict()) == {"text", "token_ids", "logprobs", "timings_ms", "stats"}


def test_lru_bounds_and_order() -> None:
    lru: LRUCache[str, int] = LRUCache(max_entries=2, max_bytes=100)
    lru.put("a", 1, 10)
    lru.put("b", 2, 10)
    assert lru.get("a") == 1  # a is now most recent
    lru.put("c", 3, 10)  # evicts b
    assert "b" not in lru and lru.get("c") == 3 and lru.get("b") is None
    assert not lru.put("huge", 4, 101) and "huge" not in lru
    lru.put("d", 5, 95)  # bytes: evicts until it fits
    assert list(lru.values()) == [5] and lru.bytes == 95
    assert lru.stats()["evictions"] == 3 and (lru.hits, lru.misses) == (2, 1)


def test_prefix_lookup_rules() -> None:
    """Longest match, cut at the first differing token or image marker, whole demos only."""
    media, eoc = 9, 8

    def state(tokens: list[int], hashes: tuple[str, ...]) -> PrefixState:
        past = {"past_key_values.0.key": np.zeros((1, 1, len(tokens), 2), np.float32)}
        return PrefixState(np.array(tokens, np.int64), hashes, past, ())

    def lookup(cache: PrefixCache, tokens: list[int], hashes: list[str]) -> int:
        ids = np.array(tokens, np.int64)
        bounds = np.flatnonzero(ids[:-1] == eoc) + 1
        return cache.lookup(ids, hashes, np.flatnonzero(ids == media), bounds)[1]

    cache = PrefixCache(max_entries=4, max_bytes=1 << 20)
    cache.store(state([1, media, 5, eoc, media, 6, eoc], ("A", "B")))
    assert lookup(cache, [1, media, 5, eoc, media, 6, eoc, media, 7], ["A", "B", "C"]) == 7
    assert lookup(cache, [1, media, 5, eoc, media, 6, eoc, media, 7], ["A", "X", "C"]) == 4
    assert lookup(cache, [1, media, 5, eoc, media, 4, eoc, media, 7], ["A", "B", "C"]) == 4
    assert lookup(cache, [1, media, 5, eoc, media, 6, eoc, media, 7], ["X", "B", "C"]) == 0
    assert lookup(cache, [1, media, 7], ["A"]) == 0  # shares <s><image>: not a whole demo
    assert lookup(cache, [1, media, 5, eoc], ["A"]) == 0  # ends with eoc: nothing after it
    cache.store(state([1, media, 5, eoc], ("A",)))
    assert lookup(cache, [1, media, 5, eoc, media, 6, eoc, media, 7], ["A", "B", "C"]) == 7
    assert cache.stats()["hits"] == 4 and cache.stats()["misses"] == 3
    assert len(pixel_digest(np.zeros((3, 2, 2), np.float32))) == 64
    assert pixel_digest(np.zeros((3, 2, 2), np.float32)) != pixel_digest(
        np.zeros((3, 4, 1), np.float32)
    )
