"""Shared fixtures: tiny OpenFlamingo-style models in the real file formats, built once per run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FAMILIES = ("llama", "gpt_neox", "mpt")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """tiny_paths(family, **kw) -> TinyPaths, cached per argument set for the whole session."""
    from fixtures.tiny import build_tiny_flamingo

    cache: dict[tuple, object] = {}

    def build(family: str, **kw: object):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = build_tiny_flamingo(root, family, **kw)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_model(tiny_paths: Callable) -> Callable:
    """tiny_model(family) -> (our model, tokenizer, report, paths), loaded through the loaders."""
    from flamingo.loaders import load_flamingo

    cache: dict[str, tuple] = {}

    def load(family: str):
        if family not in cache:
            p = tiny_paths(family)
            model, tok, report = load_flamingo(p.lm_dir, p.vision_path, p.checkpoint_path)
            cache[family] = (model, tok, report, p)
        return cache[family]

    return load


@pytest.fixture(scope="session")
def tiny_export(tiny_model: Callable, tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """tiny_export(family) -> export folder of the tiny model (fp32, opset 17)."""
    from exporter.export import export_model

    cache: dict[str, Path] = {}

    def export(family: str) -> Path:
        if family not in cache:
            model, tok, _, _ = tiny_model(family)
            out = tmp_path_factory.mktemp(f"export-{family}") / "out"
            export_model(model, tok, out, progress=None)
            cache[family] = out
        return cache[family]

    return export


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo model (models/demo) exported fp32 through the CLI, once per session."""
    from click.testing import CliRunner

    from cli.main import main

    model = Path(__file__).resolve().parents[1] / "models" / "demo"
    out = tmp_path_factory.mktemp("demo") / "fp32"
    result = CliRunner().invoke(
        main,
        ["export", "--lm", str(model / "lm"),
         "--vision", str(model / "open_clip_model.safetensors"),
         "--checkpoint", str(model / "checkpoint.safetensors"), "--output", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def idefics_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random IDEFICS -instruct folder (fixtures.idefics) exported fp32 through the CLI,
    once per session: for the runtime's other users (serve, eval, bench)."""
    from click.testing import CliRunner

    from cli.main import main
    from fixtures.idefics import build_tiny_idefics

    root = tmp_path_factory.mktemp("idefics")
    folder = build_tiny_idefics(root / "tiny", instruct=True, cross_layer_interval=2)
    out = root / "export"
    result = CliRunner().invoke(main, ["export", "--model", str(folder), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_video(tiny_paths: Callable, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(model, tokenizer, export folder) of the tiny LLaMA with frame embeddings for clips of
    up to 4 frames (`perceiver.frame_embs`), exported fp32 (max_frames 4)."""
    from exporter.export import export_model
    from flamingo.loaders import load_flamingo

    paths = tiny_paths("llama", max_num_frames=4)
    model, tok, _ = load_flamingo(paths.lm_dir, paths.vision_path, paths.checkpoint_path)
    out = tmp_path_factory.mktemp("export-video") / "out"
    export_model(model, tok, out, progress=None)
    return model, tok, out
