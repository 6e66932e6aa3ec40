"""The command line as a whole: shared flags mean one thing, every command speaks --json and
-q, the README's glossary names every flag, and old names point to the new ones."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import click
from click.testing import CliRunner

from cli.main import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _visible_commands() -> dict[str, click.Command]:
    return {n: c for n, c in main.commands.items() if not c.hidden}


def _flags() -> dict[str, dict[str, str]]:
    """long flag -> command -> parameter name."""
    out: dict[str, dict[str, str]] = {}
    for name, command in _visible_commands().items():
        for param in command.params:
            if isinstance(param, click.Option):
                out.setdefault(max(param.opts, key=len), {})[name] = param.name or ""
    return out


def test_every_command_offers_json_and_quiet() -> None:
    for name, command in _visible_commands().items():
        opts = {o for p in command.params for o in p.opts}
        assert {"--json", "-q", "--quiet"} <= opts, name


def test_a_flag_names_one_parameter_everywhere() -> None:
    for flag, where in _flags().items():
        assert len(set(where.values())) == 1, (flag, where)


def test_readme_glossary_names_every_flag() -> None:
    text = README.read_text()
    section = text[text.index("### Flags") :]
    section = section[: section.index("\n#", 1)]
    named = set(re.findall(r"`(--[a-z0-9-]+\*?)", section))
    wildcards = [n[:-1] for n in named if n.endswith("*")]
    # flags a single command owns are documented in its --help; the glossary names the shared
    # ones and every one whose name is used by more than one command
    shared = {f for f, where in _flags().items() if len(where) > 1}
    missing = [
        f
        for f in sorted(shared)
        if f not in named and not any(f.startswith(w) for w in wildcards)
        and f not in ("--json", "--quiet")
    ]  # fmt: skip
    assert not missing, missing


def test_export_refuses_an_existing_output_before_loading_the_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    missing = tmp_path / "nothing-here"
    result = CliRunner().invoke(
        main,
        ["export", "--lm", str(missing), "--vision", str(missing), "--checkpoint", str(missing),
         "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "already exists" in result.output and "nothing-here" not in result.output


def test_trt_run_points_to_run_engine_tensorrt() -> None:
    result = CliRunner().invoke(main, ["trt-run", "x", "--prompt", "hi"])
    assert result.exit_code == 2 and "run --engine tensorrt" in result.output
    assert "trt-run" not in CliRunner().invoke(main, ["--help"]).output


def test_renamed_flags_are_refused(tiny_export: Callable) -> None:
    src = str(tiny_export("llama"))
    result = CliRunner().invoke(main, ["quantize", src, "--precision", "int8", "--seed", "1"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_quiet_silences_progress(tiny_export: Callable, tmp_path: Path) -> None:
    src = str(tiny_export("llama"))
    args = ["quantize", src, "--precision", "fp16"]
    loud = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a")])
    quiet = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b"), "-q"])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "[flamingo-export]" in loud.stderr
    assert quiet.stderr == ""
    assert quiet.stdout == loud.stdout.replace(str(tmp_path / "a"), str(tmp_path / "b"))
