"""The engine without HTTP: micro-batching, seeded sampling alone, and the runtime's
`should_stop` hook (a row stopped early, the others unchanged)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime.pipeline import FlamingoPipeline
from runtime.prompts import build_few_shot_prompt, load_demos_jsonl
from serving.engine import Engine, EngineSettings, GenerateRequest, SamplingParams


def _prompt(ep) -> tuple[str, list[bytes]]:
    demos = load_demos_jsonl(ep.folder / "demos.jsonl")
    for d in demos:
        d.image = Path(d.image).read_bytes()
    return build_few_shot_prompt(demos, query_image=(ep.folder / "query.png").read_bytes())


@pytest.fixture(scope="module")
def pipe(demo_export: Path) -> FlamingoPipeline:
    return FlamingoPipeline(demo_export, threads=1)


def test_should_stop_ends_one_row_early(pipe: FlamingoPipeline, episodes) -> None:
    (p0, i0), (p1, i1) = _prompt(episodes(0)), _prompt(episodes(1))
    config = pipe.default_config(max_new_tokens=10, eos_token_ids=())  # runs all 10 steps
    alone = [pipe.generate(p, i, config).token_ids for p, i in ((p0, i0), (p1, i1))]
    seen: list[int] = []
    out = pipe.generate_batch(
        [p0, p1], [i0, i1], config, lambda row, _: seen.append(row),
        should_stop=lambda row: row == 0 and seen.count(0) >= 3,
    )  # fmt: skip
    assert out[0].token_ids == alone[0][:3]
    assert out[1].token_ids == alone[1] and len(alone[1]) == 10
    beams = pipe.default_config(max_new_tokens=10, eos_token_ids=(), num_beams=2)
    assert len(pipe.generate(p0, i0, beams).token_ids) == 10
    assert len(pipe.generate(p0, i0, beams, should_stop=lambda _: True).token_ids) < 10


async def _texts(engine: Engine, requests: list[GenerateRequest]) -> list[list[dict]]:
    async def one(request: GenerateRequest) -> list[dict]:
        return [event async for event in engine.generate(request)]

    return await asyncio.gather(*(one(r) for r in requests))


def _text(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "text")


def test_engine_batches_equal_configs_and_seeded_sampling_per_row(
    demo_export: Path, episodes
) -> None:
    engine = Engine(
        lambda: FlamingoPipeline(demo_export, threads=1),
        EngineSettings(max_batch_size=8, batch_wait_ms=200),
    )
    engine.load()
    try:
        prompts = [_prompt(episodes(i)) for i in range(4)]
        # a long request (other config) keeps the batch thread busy while the 4 queue up
        busy = GenerateRequest(*prompts[0], SamplingParams(max_tokens=400, ignore_eos=True))
        greedy = [GenerateRequest(p, i) for p, i in prompts]
        events = asyncio.run(_texts(engine, [busy, *greedy]))[1:]
        assert engine.counters["batches"] == 2 and engine.counters["rows"] == 5
        pipe = engine.pipe
        assert pipe is not None
        for (p, i), ev in zip(prompts, events):
            assert _text(ev) == pipe.generate(p, i).text
            assert ev[-1]["type"] == "usage" and ev[-1]["completion_tokens"] >= 1
        # seeded sampled requests batch together, each drawing from its own seed
        p, i = prompts[0]
        seeds = (11, 12, 11)
        sampled = [
            GenerateRequest(p, i, SamplingParams(temperature=1.5, seed=seed, max_tokens=6,
                                                 ignore_eos=True))
            for seed in seeds
        ]  # fmt: skip
        events = asyncio.run(_texts(engine, [busy, *sampled]))[1:]
        assert engine.counters["batches"] == 2 + 2  # the busy request, then the three together
        answers = []
        for seed, ev in zip(seeds, events):
            config = pipe.default_config(
                max_new_tokens=6, do_sample=True, temperature=1.5, seed=seed, eos_token_ids=()
            )
            assert _text(ev) == pipe.tokenizer.decode(pipe.generate(p, i, config).token_ids)
            answers.append(_text(ev))
        assert answers[0] == answers[2]
    finally:
        engine.close()


def test_engine_refuses_what_the_export_cannot_take(demo_export: Path) -> None:
    engine = Engine(lambda: FlamingoPipeline(demo_export, threads=1))
    engine.load()
    try:
        cases = [
            (GenerateRequest("<image>x", []), "images"),
            (GenerateRequest("<image>" * 33, [b"x"] * 33), "images"),
            (GenerateRequest("a " * 3000, []), "prompt"),
            (GenerateRequest("<image>Output:", [b"x"], SamplingParams(max_tokens=5000)),
             "max_tokens"),
            (GenerateRequest("<image>Output:", [b"x"], SamplingParams(num_beams=2, n=3)), "n"),
        ]  # fmt: skip
        for request, param in cases:
            (event,) = asyncio.run(_texts(engine, [request]))[0]
            assert event["type"] == "error" and event["status"] == 400, event
            assert event["param"] == param, event
    finally:
        engine.close()
