"""FlamingoPipeline at the edges: a hand-built GenerationConfig keeps the export's stop and pad
ids, every requested beam comes back, a seeded sampled row does not depend on its batch, the
LM's own context bounds prompts, wrong argument types and non-finite logits are clear errors,
and text decodes like transformers for an export whose tokenizer cleans up spaces."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exporter.export import export_model
from flamingo.generate import generate as reference_generate
from runtime.generation import GenerationConfig, GenerationError
from runtime.images import ImageError, PreprocessConfig, preprocess
from runtime.manifest import MANIFEST_NAME, load_manifest
from runtime.pipeline import FlamingoPipeline, TextStream

PROMPT = "<image>A red circle<|endofchunk|><image>A"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("edge-images")
    paths = []
    for i, size in enumerate([(40, 50), (64, 30), (32, 32)]):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def pipe(tiny_export) -> FlamingoPipeline:
    return FlamingoPipeline(tiny_export("llama"))


def test_a_hand_built_config_stops_at_the_exports_end_of_chunk(pipe, images) -> None:
    """edge-06's kind: GenerationConfig() leaves eos/pad unset, meaning the export's (as
    OpenFlamingo's generate stops at <|endofchunk|>); () still means never stop."""
    free = pipe.generate(PROMPT, images[:2], GenerationConfig(max_new_tokens=6, eos_token_ids=()))
    assert len(free.token_ids) == 6
    stop = free.token_ids[2]  # pretend the export's <|endofchunk|> is the third token chosen
    engine = pipe.engine
    eoc, engine.eoc_token_id = engine.eoc_token_id, stop
    try:
        plain = pipe.generate(PROMPT, images[:2], GenerationConfig(max_new_tokens=6))
        default = pipe.generate(PROMPT, images[:2], pipe.default_config(max_new_tokens=6))
    finally:
        engine.eoc_token_id = eoc
    cut = free.token_ids.index(stop) + 1
    assert plain.token_ids == default.token_ids == free.token_ids[:cut]


def test_every_requested_sequence_comes_back(tiny_model, pipe, images) -> None:
    """edge-03's kind: num_return_sequences beams per prompt, equal to the PyTorch reference's
    (tokens and scores), best first: generate_batch returns n per prompt (HF's layout),
    generate the best with the others as its alternatives."""
    model, tok, _, _ = tiny_model("llama")
    config = pipe.default_config(max_new_tokens=5, num_beams=4, num_return_sequences=3)
    streamed: list[tuple[int, int]] = []
    out = pipe.generate_batch(
        [PROMPT, "<image>A blue"],
        [images[:2], images[2:]],
        config,
        on_token=lambda r, t: streamed.append((r, t)),
    )
    assert len(out) == 2 * 3 and not any(g.alternatives for g in out)
    pixels = preprocess(images[:2], PreprocessConfig(image_size=model.cfg.vision.image_size))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref = reference_generate(model, torch.from_numpy(pixels)[None, :, None], ids, config=config)
    first = out[:3]
    assert [g.token_ids for g in first] == ref.sequences
    np.testing.assert_allclose([g.score for g in first], ref.scores, atol=1e-4)
    assert first[0].score >= first[1].score >= first[2].score  # type: ignore[operator]
    for j, g in enumerate(first):
        assert g.text == tok.decode(
            [t for t in g.token_ids if t != pipe.engine.eoc_token_id], skip_special_tokens=True
        )
        assert [t for r, t in streamed if r == j] == g.token_ids  # row = prompt * n + j
    single = pipe.generate(PROMPT, images[:2], config)
    as_dict = single.to_dict()
    assert len(as_dict["alternatives"]) == 2 and isinstance(as_dict["score"], float)
    assert [g.token_ids for g in [single, *single.alternatives]] == ref.sequences
    assert "alternatives" not in pipe.generate(PROMPT, images[:2]).to_dict()


def test_a_seeded_sampled_row_does_not_depend_on_its_batch(pipe, images) -> None:
    """edge-04's kind: one random stream per row (seed = config.seed or seeds[i])."""
    config = pipe.default_config(max_new_tokens=8, do_sample=True, top_k=0, seed=13)
    alone = pipe.generate(PROMPT, images[:2], config).token_ids
    assert pipe.generate(PROMPT, images[:2], config).token_ids == alone
    batch = pipe.generate_batch(["<image>A blue", PROMPT], [images[2:], images[:2]], config)
    assert batch[1].token_ids == alone
    mixed = pipe.generate_batch(
        [PROMPT, PROMPT, "<image>x"], [images[:2]] * 2 + [images[2:]], config, seeds=[7, 13, 7]
    )
    assert mixed[1].token_ids == alone
    assert mixed[0].token_ids == pipe.generate(PROMPT, images[:2], config, seed=7).token_ids
    assert mixed[0].token_ids != alone  # another seed, another stream
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        pipe.generate_batch([PROMPT] * 3, [images[:2]] * 3, config, seeds=[1, 2])


def test_prompts_beyond_the_lms_own_context_are_refused(tiny_export, images, tmp_path) -> None:
    """edge-05 / rel-06's kind at run time: an export declaring more tokens than its rotary LM
    was trained on (as the old 2048 default did) is held to the LM's positions."""
    pipe = FlamingoPipeline(tiny_export("llama"))  # max_position_embeddings 256
    assert pipe.max_seq_len == 256 == pipe.engine.limits["max_seq_len"]
    old = tmp_path / "old"
    shutil.copytree(tiny_export("llama"), old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    manifest["limits"]["max_seq_len"] = 2048
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    pipe = FlamingoPipeline(old)
    assert pipe.max_seq_len == 256
    prompt = "<image>" + " red" * 250
    n = len(pipe.tokenizer.encode(prompt).ids)
    message = (
        rf"prompt of {n} tokens \+ 20 new tokens = {n + 20} exceeds the maximum context of 256 "
        r"tokens \(the language model's max_position_embeddings; this export allows 2048\)"
    )
    with pytest.raises(ValueError, match=message):
        pipe.generate(prompt, images[:1])
    assert pipe.generate(prompt, images[:1], GenerationConfig(max_new_tokens=256 - n)).token_ids


def test_wrong_argument_types_are_named(pipe, images) -> None:
    """rel-23's kind: each refused before any work, with what was expected."""
    for single in (images[0], Path(images[0]), Image.open(images[0]), np.zeros((4, 4, 3))):
        with pytest.raises(ImageError, match=r"images: expected a sequence of images .*wrap a"):
            pipe.generate("<image>Output:", single)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=r"prompt #1: images: .*got str"):
        pipe.generate_batch(["<image>a", "<image>b"], [images[:1], images[0]])
    with pytest.raises(ValueError, match=r"images_per_prompt must be a list .*got str"):
        pipe.generate_batch(["<image>a"], images[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"images_per_prompt must be a list .*got NoneType"):
        pipe.generate_batch(["<image>a"], None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"prompts must be a list .*got int"):
        pipe.generate_batch(3, [[]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the prompt must be a str, got int"):
        pipe.generate(3, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the prompt is not valid UTF-8 text: character 7"):
        pipe.generate("<image>\udcffOutput:", images[:1])
    with pytest.raises(ValueError, match=r"config must be a runtime\.generation\.GenerationConfig"):
        pipe.generate("<image>a", images[:1], {"max_new_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"eos_token_ids \[100000\] outside this export's vocab"):
        pipe.generate("<image>a", images[:1], GenerationConfig(eos_token_ids=100_000))
    with pytest.raises(ValueError, match=r"pad_token_id \[100000\] outside"):
        pipe.generate("<image>a", images[:1], GenerationConfig(pad_token_id=100_000))
    config = GenerationConfig(max_new_tokens=3)
    config.num_beams = 2.5  # type: ignore[assignment]  # changed after it was checked
    with pytest.raises(ValueError, match=r"num_beams must be an int, got float 2\.5"):
        pipe.generate("<image>a", images[:1], config)
    assert pipe.generate("<image>a", images[:1], GenerationConfig(max_new_tokens=2)).token_ids


@pytest.fixture(scope="module")
def nan_export(tiny_model, tmp_path_factory) -> Path:
    """The tiny LLaMA export with NaN resampler latents: logits after an image are NaN."""
    model, tok, _, _ = tiny_model("llama")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.perceiver.latents.fill_(float("nan"))
    out = tmp_path_factory.mktemp("nan") / "export"
    export_model(broken, tok, out, progress=None)
    return out


def test_non_finite_logits_are_an_error_not_an_answer(nan_export, images) -> None:
    """rel-12's runtime half: token 0 chosen from NaN logits used to be the answer."""
    pipe = FlamingoPipeline(nan_export)
    for config in (GenerationConfig(max_new_tokens=3), GenerationConfig(num_beams=2)):
        with pytest.raises(GenerationError, match=r"non-finite logits .* at generated token 0"):
            pipe.generate("<image>A", images[:1], config)
    assert pipe.generate("A red", [], GenerationConfig(max_new_tokens=2)).token_ids  # no image


def test_run_reports_non_finite_logits_in_one_line(nan_export, images) -> None:
    from click.testing import CliRunner

    from cli.main import main

    args = ["run", str(nan_export), "--prompt", "<image>A", "--image", images[0], "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "non-finite logits" in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


@pytest.fixture(scope="module")
def clean_up_export(tiny_export, tmp_path_factory) -> Path:
    """The tiny LLaMA export whose tokenizer_config says clean_up_tokenization_spaces: true
    (as many released LM repos ship it), its hash re-recorded."""
    out = tmp_path_factory.mktemp("clean-up") / "export"
    shutil.copytree(tiny_export("llama"), out)
    config_path = out / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["clean_up_tokenization_spaces"] = True
    config_path.write_text(json.dumps(config))
    manifest = load_manifest(out, verify_hashes=False)
    manifest.record_files(out)
    manifest.write(out)
    return out


def test_text_is_what_transformers_decodes(clean_up_export, images) -> None:
    """edge-07's kind: Generation.text, TextStream and pipe.tokenizer.decode equal
    transformers' decode of the same ids with the exported tokenizer."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(clean_up_export / "tokenizer")
    pipe = FlamingoPipeline(clean_up_export)
    text = "A dog , a cat . Is it red ? it 's here"
    ids = hf(text, add_special_tokens=False).input_ids
    assert pipe.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True) != text
    eoc = pipe.engine.eoc_token_id
    for config in (
        pipe.default_config(max_new_tokens=12),
        pipe.default_config(max_new_tokens=12, do_sample=True, seed=0, top_k=0),
        pipe.default_config(max_new_tokens=8, num_beams=2),
    ):
        stream = TextStream(pipe.tokenizer, skip_ids=(eoc,))
        pieces: list[str] = []

        def show(_row: int, token: int, stream: TextStream = stream, pieces: list = pieces) -> None:
            pieces.append(stream.push(token))

        out = pipe.generate(PROMPT, images[:2], config, show)
        expect = hf.decode([t for t in out.token_ids if t != eoc], skip_special_tokens=True)
        assert out.text == expect
        assert "".join(pieces) + stream.flush() == expect


def test_pipeline_settings_of_the_wrong_kind_are_named(tiny_export) -> None:
    """A provider name or a path where a list is expected is not read as its characters; the
    thread count is bounded (onnxruntime hangs creating 100,000 threads)."""
    from runtime.engine import MAX_THREADS, SessionOptionsError
    from runtime.prompts import Demonstration

    export = tiny_export("llama")
    with pytest.raises(SessionOptionsError, match=r"providers must be a list .* wrap a single"):
        FlamingoPipeline(export, providers="CPUExecutionProvider")  # type: ignore[arg-type]
    for threads in (-1, MAX_THREADS + 1, 2.0, True):
        with pytest.raises(SessionOptionsError, match=r"threads must be an int in \[0, 256\]"):
            FlamingoPipeline(export, threads=threads)  # type: ignore[arg-type]
    for setting, value, words in (
        ("allow_spinning", "false", "allow_spinning must be True or False, got 'false'"),
        ("prefix_cache", "no", "prefix_cache must be True or False"),
        ("io_binding", None, "io_binding must be True or False"),
        ("prefix_cache_entries", "3", r"prefix_cache_entries must be an int >= 0, got '3'"),
        ("vision_cache_bytes", -1, "vision_cache_bytes must be an int >= 0"),
    ):
        with pytest.raises(ValueError, match=words):
            FlamingoPipeline(export, **{setting: value})
    pipe = FlamingoPipeline(export, threads=0)
    for demos in ("demos.jsonl", Demonstration("a.png", "red")):
        with pytest.raises(ValueError, match="demos must be a list of Demonstration"):
            pipe.few_shot(demos, "q.png")  # type: ignore[arg-type]
