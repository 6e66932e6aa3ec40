"""Clips end to end on the tiny LLaMA with frame embeddings: the vision graph's frames axis
against PyTorch, parity on video prompts (`precision.parity`, the `parity` command's code),
the pipeline mixing images and clips like the reference, the vision cache keyed by every frame,
the errors, the export's frame limit and manifest schema, and TensorRT profiles / `check` /
the TensorRT engine's clip runs (onnxruntime standing in)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from exporter.export import ExportError, ExportOptions
from flamingo.generate import TorchStepModel
from precision.data import Episode
from precision.parity import OnnxBackend, TorchBackend, run_parity
from runtime.engine import OnnxFlamingo
from runtime.generation import GenerationConfig, generate
from runtime.images import PreprocessConfig
from runtime.manifest import SCHEMA_VERSION, ManifestError, load_manifest
from runtime.pipeline import FlamingoPipeline
from runtime.spec import NUM_FRAMES, NUM_IMAGES, cross_attn_names
from runtime.tokenizer import load_export_tokenizer
from runtime.video import Video, VideoError, encode_media, preprocess_media

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _clip(seed: int, frames: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)) for _ in range(frames)
    ]


def _image(seed: int) -> Image.Image:
    return _clip(100 + seed, 1)[0]


def test_vision_graph_takes_frames_like_pytorch(tiny_video) -> None:
    model, _, out = tiny_video
    manifest = load_manifest(out)
    assert manifest.limits["max_frames"] == 4 and manifest.schema_version == SCHEMA_VERSION
    spec = manifest.graphs["vision"].spec
    assert spec.inputs[0].shape == (NUM_IMAGES, NUM_FRAMES, 3, 32, 32)
    engine, reference = OnnxFlamingo(out), TorchBackend(model)
    rng = np.random.default_rng(0)
    for frames in (1, 2, 3, 4):
        pixels = rng.standard_normal((3, frames, 3, 32, 32)).astype(np.float32)
        got, want = engine.encode_images(pixels), reference.encode(pixels)
        for name in want:
            assert np.abs(got[name] - want[name]).max() <= 1e-4, (frames, name)
    # images as before: (N, 3, S, S) is N one-frame items
    images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = engine.encode_images(images)["image_latents"]
    assert np.abs(got - engine.encode_images(images[:, None])["image_latents"]).max() == 0
    with pytest.raises(ValueError, match=r"5 frames per media item: this export takes 1\.\.4"):
        engine.encode_images(rng.standard_normal((1, 5, 3, 32, 32)).astype(np.float32))


def test_parity_on_video_prompts(tiny_video) -> None:
    """`parity` (export vs PyTorch) on prompts mixing clips of 1-4 frames and images: every
    output within 1e-4, greedy identical, the fp32 gate passes."""
    model, _, out = tiny_video
    tok = load_export_tokenizer(out, load_manifest(out))
    episodes = [
        Episode("<image>A<|endofchunk|><image>B<|endofchunk|><image>",
                (Video(_clip(1), 4), _image(1), Video(_clip(2), 3)), "caption", 2),
        Episode("<image>one<|endofchunk|><image>",
                (Video(_clip(3), 2), Video(_clip(4))), "caption", 1),
    ]  # fmt: skip
    result = run_parity(TorchBackend(model), OnnxBackend(out), episodes, tok, decode_steps=6)
    assert not result["failures"], result["failures"]
    m = result["metrics"]
    assert max(v["max_abs"] for v in m["vision"].values()) <= 1e-4
    assert m["decoder"]["max_abs"] <= 1e-4 and m["pipeline"]["max_abs"] <= 1e-4
    assert m["pipeline"]["greedy_exact_match"] == 1.0


@torch.no_grad()
def test_pipeline_mixes_images_and_clips_like_the_reference(tiny_video) -> None:
    model, _, out = tiny_video
    pipe = FlamingoPipeline(out)
    prompt = "<image>A red<|endofchunk|><image>B<|endofchunk|><image>C<image>"
    media = [_image(0), Video(_clip(5)), Video(_clip(6), 2), _image(2)]
    config = GenerationConfig(max_new_tokens=8)
    got = pipe.generate(prompt, media, config)
    # the reference: each item's latents by the PyTorch model, K/V per row, the shared search
    pixels = preprocess_media(media, PreprocessConfig(image_size=32), max_frames=4)
    assert [len(p) for p in pixels] == [1, 4, 2, 1]
    features = encode_media(TorchBackend(model).encode, pixels)
    cross = pipe.engine.rows_cross_kv(
        {n: features[n] for n in pipe._xattn_names}, [list(range(len(media)))]
    )
    step_model = TorchStepModel.from_cross_kv(model, cross, np.array([len(media)]))
    ids = np.array([pipe.tokenizer.encode(prompt).ids])
    want = generate(step_model, ids, np.ones_like(ids), pipe.default_config(max_new_tokens=8))
    assert got.token_ids == want.sequences[0]
    assert np.abs(np.array(got.logprobs) - np.array(want.logprobs[0])).max() <= 1e-4
    # media fill the markers in order: swapping the two clips changes the answer's numbers
    swapped = pipe.generate(prompt, [media[0], media[2], media[1], media[3]], config)
    assert swapped.logprobs != got.logprobs


def test_vision_cache_keys_a_clip_by_all_its_frames(tiny_video) -> None:
    _, _, out = tiny_video
    pipe = FlamingoPipeline(out)
    config = GenerationConfig(max_new_tokens=2)
    frames = _clip(7, 4)
    pipe.generate("<image>x", [Video(frames)], config)
    assert pipe.cache_stats()["vision"]["misses"] == 1
    pipe.generate("<image>y", [Video(list(frames))], config)  # same frames: a hit
    assert pipe.cache_stats()["vision"]["hits"] == 1
    changed = [*frames[:3], _image(9)]  # the last frame differs
    reordered = [frames[1], frames[0], *frames[2:]]
    for other in (Video(changed), Video(reordered), Video(frames, 2)):
        before = pipe.cache_stats()["vision"]["misses"]
        pipe.generate("<image>z", [other], config)
        assert pipe.cache_stats()["vision"]["misses"] == before + 1


def test_pipeline_clip_errors(tiny_video, tmp_path) -> None:
    _, _, out = tiny_video
    pipe = FlamingoPipeline(out)
    config = GenerationConfig(max_new_tokens=2)
    with pytest.raises(
        VideoError, match=r"media #0 .*5 frames asked, this export allows at most 4"
    ):
        pipe.generate("<image>x", [Video(_clip(1), 5)], config)
    with pytest.raises(VideoError, match=r"has 3 frames, 4 were asked"):
        pipe.generate("<image>x", [Video(_clip(1, 3))], config)  # default: max_frames
    empty = tmp_path / "frames"
    empty.mkdir()
    with pytest.raises(VideoError, match="no frames"):
        pipe.generate("<image>x", [Video(empty)], config)
    with pytest.raises(VideoError, match="file not found"):
        pipe.generate("<image>x", [Video(tmp_path / "nothing.mp4")], config)
    # an image-only export (max_frames 1) takes a clip only as its middle frame, when asked
    image_only = FlamingoPipeline(out)
    image_only.max_frames = 1
    with pytest.raises(VideoError, match="max_frames 1"):
        image_only.generate("<image>x", [Video(_clip(1))], config)


def test_export_frame_limit() -> None:
    def cfg(frames: int | None) -> dict:
        return {
            "lm": {"family": "llama", "max_position_embeddings": 512},
            "resampler": {"max_num_frames": frames},
        }

    def frames_of(options: ExportOptions, embeddings: int | None) -> int:
        return options.with_model(cfg(embeddings), lambda _m: None).max_frames

    assert frames_of(ExportOptions(), 4) == 4  # the frame embeddings
    assert frames_of(ExportOptions(), None) == 1  # images only
    assert frames_of(ExportOptions(max_frames=2), 4) == 2
    assert frames_of(ExportOptions(max_frames=8), None) == 8  # unordered frames, when asked
    with pytest.raises(ExportError, match="--max-frames 5 exceeds the 4 frame embeddings"):
        frames_of(ExportOptions(max_frames=5), 4)
    with pytest.raises(ExportError, match="--max-frames must be >= 1"):
        ExportOptions(max_frames=0).validate()


def test_an_export_before_video_or_beyond_its_frame_embeddings_is_refused(
    tiny_video, tmp_path
) -> None:
    import shutil

    _, _, out = tiny_video
    old = tmp_path / "old"
    shutil.copytree(out, old)
    data = json.loads((old / "manifest.json").read_text())
    data["schema_version"] = 2
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"schema_version 2 .*4: vision input pixel_values"):
        load_manifest(old)
    data["schema_version"] = SCHEMA_VERSION
    del data["limits"]["max_frames"]
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"limits: missing required key 'max_frames'"):
        load_manifest(old)
    data["limits"]["max_frames"] = 5  # the schema allows it; the frame embeddings do not
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"limits.max_frames 5 exceeds .*max_num_frames 4"):
        load_manifest(old)


def test_tensorrt_profiles_and_check_cover_frames(tiny_video) -> None:
    from runtime.spec import ModelDims
    from trt.profiles import Limits, ProfileError, clips_per_run, graph_profiles
    from trt.rules import check_export

    _, _, out = tiny_video
    manifest = load_manifest(out)
    dims = ModelDims.from_config(manifest.model)
    limits = Limits.resolve(manifest.limits)
    images, clips = graph_profiles("vision", dims, limits)
    assert (images.name, clips.name) == ("images", "clips")
    assert images.dims[NUM_FRAMES].to_list() == [1, 1, 1]
    assert clips.dims[NUM_FRAMES].to_list() == [2, 4, 4]
    assert clips.dims[NUM_IMAGES].max == clips_per_run(limits) == 32 // 4
    for profile in (images, clips):  # every input resolves, frames included
        shapes = profile.shapes(manifest.graphs["vision"].spec)["pixel_values"]
        assert shapes[2][:2] == [profile.dims[NUM_IMAGES].max, profile.dims[NUM_FRAMES].max]
    (only,) = graph_profiles("vision", dims, Limits.resolve(manifest.limits, max_frames=1))
    assert only.name == "images"
    with pytest.raises(ProfileError, match="--max-frames 8 exceeds the export's max_frames 4"):
        Limits.resolve(manifest.limits, max_frames=8)
    report = check_export(out, "10")
    assert report.ok, report.format()
    assert not [f for g in report.graphs for f in g.findings if f.rule == "profiles"]


def test_tensorrt_engine_runs_clips_in_parts(tiny_video, tmp_path) -> None:
    """Clips run under the "clips" profile, max_images // max_frames per run (here 1), and
    equal onnxruntime's single run; images keep the "images" profile."""
    from tests.trt.stand_in import fake_build, stand_in_engine

    _, _, out = tiny_video
    built = fake_build(out, tmp_path / "built", max_images=3)  # clips per run: max(1, 3 // 4)
    trt, ort = stand_in_engine(built), OnnxFlamingo(built)
    rng = np.random.default_rng(4)
    for shape in ((3, 4, 3, 32, 32), (2, 2, 3, 32, 32), (3, 1, 3, 32, 32)):
        pixels = rng.standard_normal(shape).astype(np.float32)
        got, want = trt.encode_images(pixels), ort.encode_images(pixels)
        for name in want:
            assert np.abs(got[name] - want[name]).max() <= 1e-6, (shape, name)
    assert trt.executors["vision"].profile == 0  # the last run: images
    names = [n for j in trt.dims.xattn_layers for n in cross_attn_names(j)]
    assert set(names) <= set(got)


def test_run_command_takes_clips_in_command_line_order(tiny_video, tmp_path) -> None:
    """`run --video` (a folder of frames, an animated GIF) fills the markers in the order the
    --image/--video flags are typed, equal to the pipeline given the same media in that order;
    a few-shot JSONL takes {"video": ...}; bad clips are one-line errors."""
    from click.testing import CliRunner

    from cli.main import main

    _, _, out = tiny_video
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(_clip(1, 5)):
        frame.save(folder / f"frame_{i:03d}.png")
    gif = tmp_path / "clip.gif"
    frames = _clip(2, 6)
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50)
    image = tmp_path / "a.png"
    _image(3).save(image)
    prompt = "<image>A<image>B<image>C"
    args = ["run", str(out), "--prompt", prompt, "--max-new-tokens", "3", "--json", "-q"]
    args += ["--video", str(folder), "--image", str(image), "--video", str(gif)]
    args += ["--num-frames", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["token_ids"]
    media = [Video(str(folder), 3), str(image), Video(str(gif), 3)]
    config = GenerationConfig(max_new_tokens=3)
    want = FlamingoPipeline(out).generate(prompt, media, config).token_ids
    assert got == want

    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"video": "frames", "caption": "red"}) + "\n")
    few = ["run", str(out), "--demos", str(demos), "--video", str(gif), "--max-new-tokens", "2"]
    result = CliRunner().invoke(main, [*few, "--json", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["demonstrations"] == [{"video": str(folder), "text": "red"}]
    assert record["query_video"] == str(gif)

    short = tmp_path / "short"
    short.mkdir()
    for i, frame in enumerate(_clip(4, 2)):
        frame.save(short / f"{i}.png")
    for bad, message in (
        (["--video", str(tmp_path / "missing.mp4")], "missing.mp4: file not found"),
        (["--video", str(folder), "--num-frames", "9"], "9 frames asked, this export allows"),
        (["--video", str(short), "--num-frames", "3"], "has 2 frames, 3 were asked"),
    ):
        result = CliRunner().invoke(main, ["run", str(out), "--prompt", "<image>A", *bad])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output, result.output

    image_demos = tmp_path / "image_demos.jsonl"
    image_demos.write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n")
    for extra, message in (
        ([], "no --video given"),
        (["--demos", str(image_demos)], "neither --video nor"),
    ):
        args = ["run", str(out), "--image", str(image), "--num-frames", "2", *extra]
        if not extra:
            args += ["--prompt", "<image>A"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and message in result.output, result.output
