"""IDEFICS through export + the torch-free runtime, against transformers' own
IdeficsForVisionText2Text.generate fed by IdeficsProcessor: prompt text, token ids, pixels,
the media rule across steps, and greedy / 3-beam generations token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from exporter.export import export_model
from fixtures.idefics import build_tiny_idefics
from flamingo.idefics import load_idefics
from runtime.decoding import MediaCounter
from runtime.idefics import IdeficsPromptFormat, idefics_text
from runtime.images import PreprocessConfig, preprocess
from runtime.manifest import load_manifest
from runtime.pipeline import FlamingoPipeline

VARIANTS = {
    # beam search works in transformers only without decoupled logits
    "resampler-float-2-instruct": dict(cross_layer_interval=2, instruct=True),
    "noresampler-vector-1-decoupled": dict(
        use_resampler=False, alpha_type="vector", decoupled=True, qk_layer_norms=True
    ),
}


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = [
        Image.fromarray(rng.integers(0, 256, (40, 30 + 5 * i, 3), dtype=np.uint8)) for i in range(3)
    ]
    rgba = rng.integers(0, 256, (23, 41, 4), dtype=np.uint8)
    out.append(Image.fromarray(rgba, "RGBA"))  # alpha: IDEFICS composites it over white
    return out


# (runtime prompt with <image> markers, images) and the processor's item list for it:
# interleaved multi-image, consecutive images, text before the first image, an EOS in the
# text (the next tokens see no image), a one-image row shorter than the others (left padding)
def cases():
    a, b, c, d = pictures()
    return [
        (
            "A red<image>circle on a <image><image> The cat</s> dog sits<image>Output:",
            [a, b, c, d],
            ["A red", a, "circle on a ", b, c, " The cat</s> dog sits", d, "Output:"],
        ),
        ("<image>The cat", [a], [a, "The cat"]),
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    root = tmp_path_factory.mktemp("idefics_export")
    out = {}
    for name, kw in VARIANTS.items():
        folder = build_tiny_idefics(root / name, **kw)
        model, tok, _ = load_idefics(folder)
        export_model(model, tok, root / f"{name}-export", progress=None)
        hf = IdeficsForVisionText2Text.from_pretrained(folder).eval()
        out[name] = (root / f"{name}-export", hf, AutoProcessor.from_pretrained(folder))
    return out


def test_prompt_text_is_the_processors(exported):
    from transformers.models.idefics.processing_idefics import IdeficsProcessor

    _, _, processor = exported["resampler-float-2-instruct"]
    fmt = IdeficsPromptFormat.from_dict(
        load_manifest(exported["resampler-float-2-instruct"][0]).prompt
    )
    assert fmt.end_of_utterance_token == "<end_of_utterance>"
    seen = []
    original = processor.tokenizer.__class__.__call__

    def spy(self, text, **kw):
        seen.extend(text)
        return original(self, text, **kw)

    processor.tokenizer.__class__.__call__ = spy
    try:
        for prompt, _, items in cases():
            IdeficsProcessor.__call__(processor, text=[items], return_tensors="pt")
            assert idefics_text(prompt, fmt) == seen[-1]
    finally:
        processor.tokenizer.__class__.__call__ = original


def test_pixels_are_the_image_processors(exported):
    export, _, processor = exported["resampler-float-2-instruct"]
    config = PreprocessConfig.from_dict(load_manifest(export).preprocess)
    assert config.resize_mode == "squash" and config.rgb_first
    images = [*pictures(), pictures()[0].convert("P"), pictures()[1].convert("L")]
    expected = processor.image_processor(images, return_tensors="pt").numpy()
    assert np.abs(preprocess(images, config) - expected).max() <= 1e-6


def test_media_rule_across_steps_is_the_processors(exported):
    _, _, processor = exported["resampler-float-2-instruct"]
    _, _, items = cases()[0]
    inputs = processor(text=[items], return_tensors="pt")
    ids = inputs["input_ids"].numpy()
    hf = (inputs["image_attention_mask"].long() * torch.arange(1, 5)).sum(-1).numpy()
    tok = processor.tokenizer
    for split in (1, 7, ids.shape[1] - 3):  # a cached prefix, then the rest
        counter = MediaCounter(tok.convert_tokens_to_ids("<image>"), [4], tok.eos_token_id)
        got = np.concatenate([counter(ids[:, :split]), counter(ids[:, split:])], axis=1)
        assert np.array_equal(got, hf)
    assert (hf == 0).sum() > 1 and hf[0, -1] == 4
    # generated tokens keep the prompt's last image, whatever they are (generate's rule)
    counter.end_prompt()
    generated = np.array([[tok.eos_token_id, tok.convert_tokens_to_ids("<image>"), 5]])
    assert np.array_equal(counter(generated), [[4, 4, 4]])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("beams", [1, 3])
def test_generations_match_transformers(exported, variant, beams):
    if beams > 1 and "decoupled" in variant:
        pytest.skip("transformers 4.57's beam search fails on decoupled logits")
    export, hf, processor = exported[variant]
    rows = cases()
    inputs = processor(text=[items for _, _, items in rows], return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any()  # a left-padded batch
    new = 10
    pipe = FlamingoPipeline(export)
    # -instruct stops at </s> or <end_of_utterance>, as the model card's generate call does
    stops = [hf.generation_config.eos_token_id]
    if "instruct" in variant:
        stops.append(processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>"))
    assert list(pipe.stop_token_ids) == stops
    with torch.no_grad():
        out = hf.generate(
            **inputs, max_new_tokens=new, do_sample=False, num_beams=beams, eos_token_id=stops
        )
    expected = out[:, inputs["input_ids"].shape[1] :].tolist()
    for (prompt, _, _), ids, mask in zip(
        rows, inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
    ):
        assert pipe.token_ids(prompt).tolist() == [t for t, m in zip(ids, mask) if m]
    config = pipe.default_config(max_new_tokens=new, num_beams=beams)
    generations = pipe.generate_batch([p for p, _, _ in rows], [i for _, i, _ in rows], config)
    pad = hf.generation_config.pad_token_id
    for want, got in zip(expected, generations):
        ends = [i for i, t in enumerate(want) if t in stops]
        if ends:  # HF pads a finished row after its stop token
            want = want[: ends[0] + 1]
        assert got.token_ids == want, (want, got.token_ids, pad)
    assert any(len(set(g.token_ids)) > 1 for g in generations)


def test_cli_inspect_export_run(tmp_path):
    import json

    from click.testing import CliRunner

    from cli.main import main

    folder = build_tiny_idefics(tmp_path / "tiny", decoupled=True, use_resampler=False)
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", "--model", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["media_rule"] == "idefics" and info["image_tokens"] == 5
    assert info["num_parameters"]["perceiver"] == 0
    result = runner.invoke(main, ["inspect", "--model", str(folder), "--lm", str(folder)])
    assert result.exit_code != 0 and "--model (an IDEFICS folder) does not take --lm" in (
        result.output
    )
    result = runner.invoke(main, ["inspect"])
    assert result.exit_code != 0
    assert "needs --lm, --vision and --checkpoint (or --model DIR" in result.output
    out = tmp_path / "export"
    result = runner.invoke(main, ["export", "--model", str(folder), "--output", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).prompt["format"] == "idefics"
    image = tmp_path / "a.png"
    pictures()[0].save(image)
    args = ["run", str(out), "--prompt", "User:<image>Describe", "--image", str(image)]
    result = runner.invoke(main, [*args, "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output


def write_demos(folder, records) -> tuple:
    """`records` (dicts with 'caption' or 'question'/'answer') as a demos JSONL beside their
    images; returns (file, the images in order, the query image's path)."""
    import json

    a, b, c, d = pictures()
    images = [a, b, c][: len(records)]
    lines = []
    for i, (record, image) in enumerate(zip(records, images)):
        image.save(folder / f"demo{i}.png")
        lines.append(json.dumps({"image": f"demo{i}.png", **record}))
    (folder / "demos.jsonl").write_text("\n".join(lines) + "\n")
    d.save(folder / "query.png")
    return folder / "demos.jsonl", images, folder / "query.png"


DEMOS = [
    {"caption": " A red circle ", "question": "What is it? ", "answer": "a circle"},
    {"caption": "Two cats</s> on a mat", "question": " Which colour?", "answer": "blue"},
    {"caption": "dog", "question": "How many?", "answer": "2 "},
]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_run_demos_are_the_processors(exported, tmp_path, variant, task):
    """`run --demos` on a JSONL of 3 shots: the token ids are IdeficsProcessor's for the same
    demonstrations as its item list, base and -instruct (its <end_of_utterance> ends each
    demonstration), and the greedy answer is IdeficsForVisionText2Text.generate's."""
    import json

    from click.testing import CliRunner

    from cli.main import main
    from runtime.prompts import load_demos_jsonl

    export, hf, processor = exported[variant]
    file, images, query = write_demos(tmp_path, DEMOS)
    question = "What is shown ?" if task == "vqa" else None
    pipe = FlamingoPipeline(export)
    end = "<end_of_utterance>" if "instruct" in variant else ""
    assert pipe.end_of_chunk == end
    items: list = []
    for record, image in zip(DEMOS, images):
        if task == "caption":
            text = f"Output:{record['caption'].strip()}{end}\n"
        else:
            text = f"Question:{record['question']} Short answer:{record['answer']}{end}\n"
        items += [image, text]
    query_image = Image.open(query)
    items += [query_image, "Output:" if task == "caption" else f"Question:{question} Short answer:"]
    inputs = processor(text=[items], return_tensors="pt")
    prompt, _ = pipe.few_shot_prompt(load_demos_jsonl(file), question, task, str(query))
    assert pipe.token_ids(prompt).tolist() == inputs["input_ids"][0].tolist()
    if end:
        assert inputs["input_ids"][0].tolist().count(pipe.tokenizer.token_to_id(end)) == 3

    new = 6
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=new, do_sample=False)
    want = out[0, inputs["input_ids"].shape[1] :].tolist()
    args = ["run", str(export), "--demos", str(file), "--image", str(query), "--json"]
    args += ["--max-new-tokens", str(new)]
    args += ["--task", "vqa", "--question", question] if task == "vqa" else []
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)["token_ids"]
    eos = hf.generation_config.eos_token_id
    assert got == (want[: want.index(eos) + 1] if eos in want else want)


def test_a_split_restarts_exactly_where_the_image_count_is_the_state(exported):
    """count_is_media_state: a media counter restarted at p from the image count gives the
    full run's indices wherever it says so, and where an EOS follows the last image before p
    (IDEFICS' rule) a restart from the count alone would be wrong."""
    from runtime.decoding import count_is_media_state

    _, _, processor = exported["resampler-float-2-instruct"]
    tok = processor.tokenizer
    media, eos = tok.convert_tokens_to_ids("<image>"), tok.eos_token_id
    ids = processor(text=[cases()[0][2]], return_tensors="pt")["input_ids"][0].numpy()
    full = MediaCounter(media, [4], eos)(ids[None])[0]
    resumable = count_is_media_state(ids, media, eos)
    wrong = 0
    for p in range(1, len(ids)):
        restarted = MediaCounter(media, [4], eos)
        restarted.count = np.array([int((ids[:p] == media).sum())])
        same = np.array_equal(restarted(ids[None, p:])[0], full[p:])
        assert same or not resumable[p], p
        wrong += not same
    assert wrong > 0 and not resumable.all()
    assert count_is_media_state(ids, media, None).all()  # OpenFlamingo: always


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_reuse_gives_the_full_prefills_generations(exported, tmp_path, variant):
    """Prefix reuse on IDEFICS few-shot prompts (a demonstration with an EOS after its image,
    queries sharing demonstrations, a left-padded batch): the same tokens and log-probs
    (1e-5) as the pipeline without the prefix cache, with prefix tokens reused."""
    from runtime.prompts import load_demos_jsonl

    export, _, _ = exported[variant]
    file, _, query = write_demos(tmp_path, DEMOS)
    demos = load_demos_jsonl(file)
    a, b, _, d = pictures()
    cached, plain = FlamingoPipeline(export), FlamingoPipeline(export, prefix_cache=False)
    config = cached.default_config(max_new_tokens=5)
    prompts = [
        cached.few_shot_prompt(demos, None, "caption", str(query)),
        cached.few_shot_prompt(demos, None, "caption", a),
        cached.few_shot_prompt(demos[:2], None, "caption", b),
        cached.few_shot_prompt(demos[:1], "What ?", "vqa", d),
    ]
    reused = 0
    for batch in ([prompts[0]], [prompts[1]], prompts[1:], [prompts[2], prompts[0]]):
        texts, media = [p for p, _ in batch], [m for _, m in batch]
        got = cached.generate_batch(texts, media, config)
        want = plain.generate_batch(texts, media, config)
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids
            assert np.allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=0)
            reused += g.stats["cached_tokens"]
    assert reused > 0 and cached.cache_stats()["prefix"]["hits"] > 0
