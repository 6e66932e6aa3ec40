"""The README's `inspect` outputs are what the commands print today (the newcomer pass found
both blocks stale): the demo model's and the tiny IDEFICS folder's."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def readme_block(command: str) -> tuple[list[str], str]:
    """(argv after `flamingo-export`, the output lines the README shows under `$ command`)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"$ {command}\n") + len(command) + 3
    lines = []
    for line in text[start:].splitlines():
        if line.startswith(("$ ", "```")):
            break
        lines.append(line)
    return shlex.split(command)[1:], "\n".join(lines)


def test_demo_inspect_output_is_the_readmes(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    args, shown = readme_block(
        "flamingo-export inspect --lm models/demo/lm --vision "
        "models/demo/open_clip_model.safetensors --checkpoint models/demo/checkpoint.safetensors"
    )
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip("\n") == shown


@pytest.mark.slow
def test_idefics_inspect_output_is_the_readmes(tmp_path) -> None:
    from fixtures.idefics import main as build

    folder = tmp_path / "idefics-tiny"
    build([str(folder), "--instruct"])
    args, shown = readme_block("flamingo-export inspect --model /tmp/idefics-tiny")
    result = CliRunner().invoke(main, [*args[:-1], str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip("\n") == shown


def test_help_shows_no_missing_bounds() -> None:
    """An unbounded finite float option says "finite", not "x<=None" (newcomer pass)."""
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0 and "None" not in result.output
    assert "--length-penalty" in result.output and "finite]" in result.output
