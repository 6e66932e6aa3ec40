"""The command line as a whole: shared flags mean one thing, every command speaks --json and
-q, the README's glossary names every flag, and old names point to the new ones."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import click
from click.testing import CliRunner

from cli.main import main
from cli.options import RENAMED_FLAGS

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


def test_every_float_option_refuses_nan_and_inf() -> None:
    """NaN passes every range comparison: a plain float option let `--settle-ms nan` or
    `--batch-wait-ms inf` through to a traceback or a spinning thread. Every float option is
    a cli.options.FiniteFloatRange; each is tried with nan and inf."""
    from cli.options import FiniteFloatRange

    runner = CliRunner()
    for name, command in _visible_commands().items():
        for param in command.params:
            if not isinstance(param, click.Option) or not isinstance(
                param.type, click.types.FloatParamType
            ):
                continue
            flag = max(param.opts, key=len)
            assert isinstance(param.type, FiniteFloatRange), (name, flag)
            for bad in ("nan", "inf", "-inf"):
                result = runner.invoke(main, [name, flag, bad])  # converted before the rest
                refused = "not a finite number" in result.output or "not in the range" in (
                    result.output
                )
                assert result.exit_code == 2 and refused, (name, flag, bad, result.output)


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


def _glossary_rows() -> list[tuple[list[str], str]]:
    """(flags of the first column, commands column) per row of the README's flag table."""
    text = README.read_text()
    table = text[text.index("| flag |", text.index("### Flags")) :]
    rows = []
    for line in table[: table.index("\n\n")].splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((re.findall(r"`(--[a-z0-9-]+)`", cells[0]), cells[-1]))
    return rows


def test_readme_glossary_lists_the_commands_each_flag_belongs_to() -> None:
    """Every command the table lists for a flag has it, and every command with it is listed:
    `cmd, cmd` for the row's flags, `(`--flag` also cmd)` / `(`--flag`: not cmd)` for one."""
    claimed: dict[str, set[str]] = {}
    for flags, commands in _glossary_rows():
        main_list = re.sub(r"\([^)]*\)", "", commands)
        names = {c.strip() for c in main_list.split(",") if c.strip()}
        for flag in flags:
            claimed.setdefault(flag, set()).update(names)
        for note in re.findall(r"\(([^)]*)\)", commands):
            flag = re.match(r"`(--[a-z0-9-]+)`", note)
            assert flag, (commands, note)
            add = re.fullmatch(r"`--[a-z0-9-]+` also ([a-z, -]+)", note)
            drop = re.fullmatch(r"`--[a-z0-9-]+`: not ([a-z, -]+)", note)
            assert add or drop, note
            words = {c.strip() for c in (add or drop).group(1).split(",")}  # type: ignore[union-attr]
            claimed[flag.group(1)] = (
                claimed[flag.group(1)] | words if add else claimed[flag.group(1)] - words
            )
    actual = _flags()
    for flag, commands in claimed.items():
        assert commands == set(actual.get(flag, {})), (flag, commands, set(actual.get(flag, {})))


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
    assert "Did you mean '--calibration-seed'?" in result.output  # as parity --seed's hint
    flags = _flags()
    for command, renames in RENAMED_FLAGS.items():
        for old, new in renames.items():  # each old name is gone and its new one is there
            assert command not in flags.get(old, {}) and command in flags[new], (command, old)


def test_quiet_silences_progress(tiny_export: Callable, tmp_path: Path) -> None:
    src = str(tiny_export("llama"))
    args = ["quantize", src, "--precision", "fp16"]
    loud = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a")])
    quiet = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b"), "-q"])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "[flamingo-export]" in loud.stderr
    assert quiet.stderr == ""
    assert quiet.stdout == loud.stdout.replace(str(tmp_path / "a"), str(tmp_path / "b"))


def test_json_output_is_strict_json() -> None:
    import json

    from cli.options import json_safe

    value = {"logprobs": [float("nan"), -1.5, float("-inf")], "score": float("inf"), "n": 3}
    assert json_safe(value) == {"logprobs": [None, -1.5, None], "score": None, "n": 3}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text


def test_run_refuses_bad_settings_in_one_line(tiny_export: Callable, tmp_path: Path) -> None:
    """rel-02 / rel-03 / rel-04 / rel-05's kinds at the command line: each a one-line error
    naming the setting, never a traceback, an empty answer or an unbounded allocation."""
    import json

    import numpy as np
    from PIL import Image

    image = tmp_path / "q.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    base = ["run", str(tiny_export("llama")), "--image", str(image), "--max-new-tokens", "3"]
    prompt = ["--prompt", "<image>Output:"]
    demos = tmp_path / "demos.jsonl"
    cases = [
        ([*prompt, "--num-beams", "50000"], 1, "num_beams must be in [1, 64], got 50000"),
        ([*prompt, "--num-beams", "3", "--length-penalty", "nan"], 2,
         "'--length-penalty': 'nan' is not a finite number"),
        ([*prompt, "--num-beams", "3", "--length-penalty", "-inf"], 2,
         "'--length-penalty': '-inf' is not a finite number"),
        ([*prompt, "--do-sample", "--temperature", "inf"], 2,
         "'--temperature': 'inf' is not a finite number"),
        ([*prompt, "--do-sample", "--seed", "-1"], 1, "seed must be >= 0"),
        ([*prompt, "--threads", "-1"], 2, "-1 is not in the range x>=0"),
        ([*prompt, "--threads", "100000"], 1, "threads must be an int in [0, 256]"),
        (["--prompt", "\udcff<image>Output:"], 1, "--prompt is not valid UTF-8 text"),
        (["--demos", str(demos)], 1, "demos.jsonl:1: 'caption' is not valid UTF-8 text"),
        (["--demos", str(demos)], 1, "demos.jsonl:1: 'caption' must not contain '<|endofchunk|>'"),
    ]  # fmt: skip
    captions = ["\ud800"] * 9 + ["red<|endofchunk|>Output:green"]
    for (args, code, message), caption in zip(cases, captions):
        demos.write_text(json.dumps({"image": str(image), "caption": caption}) + "\n")
        result = CliRunner().invoke(main, [*base, *args])
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
    result = CliRunner().invoke(main, [*base, *prompt, "--temperature", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    assert "note: temperature=0.5: only used by sampling" in result.stderr
    json.loads(result.stdout)


def test_readme_names_every_tiny_fixture_family() -> None:
    from fixtures.tiny import FAMILIES

    named = re.search(r"python -m fixtures\.tiny OUT --family\s+([a-z_|]+)", README.read_text())
    assert named and tuple(named.group(1).split("|")) == FAMILIES


def test_export_opset_help_agrees_with_the_parser_tables() -> None:
    """What `export --help` says about --opset is derived from trt/parser_tables.py, the table
    `check --trt-version` applies: opset 17's LayerNormalization is not parsed by 8.5."""
    from trt.parser_tables import RULES, opset_advice

    text = " ".join(CliRunner().invoke(main, ["export", "--help"]).output.split())
    assert opset_advice() in text
    assert "LayerNormalization" not in RULES["8.5"].ops
    assert f"TensorRT 8.5 (JetPack {RULES['8.5'].jetpack}) needs --opset 16" in text
    assert "8.5+" not in text


def test_run_template_errors_name_the_cli_flags(tiny_export: Callable, tmp_path: Path) -> None:
    """--task vqa and --question go together; the errors name those flags, not the library's
    keyword (query_question) or a task the CLI does not offer (raw)."""
    image = tmp_path / "q.png"
    image.write_bytes(b"not read: the flags are checked first")
    base = ["run", str(tiny_export("llama")), "--image", str(image)]
    for args, message in (
        (["--task", "vqa"], "--task vqa needs --question"),
        (["--question", "What colour?"], "--question is only used with --task vqa"),
        (["--task", "caption", "--question", "Q?"], "--question is only used with --task vqa"),
    ):
        result = CliRunner().invoke(main, [*base, *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "query_question" not in result.output and "raw" not in result.output


def test_no_allow_spinning_reaches_every_onnxruntime_session(tiny_export: Callable) -> None:
    """`--no-allow-spinning` (cli.options.spinning_option) turns onnxruntime's
    session.intra_op.allow_spinning off for the decoder too; the default leaves it on."""
    from cli.options import open_pipeline

    def spinning(pipe: object, graph: str) -> str:
        options = pipe.engine.sessions[graph].get_session_options()  # type: ignore[attr-defined]
        try:
            return options.get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default (spin)
            return "default"

    def say(_message: str) -> None:
        pass

    export = tiny_export("llama")
    off = open_pipeline(export, "onnxruntime", (), 1, False, say, allow_spinning=False)
    assert spinning(off, "decoder") == spinning(off, "vision") == "0"
    on = open_pipeline(export, "onnxruntime", (), 1, False, say)
    assert spinning(on, "decoder") == "default"
    for command in ("run", "bench", "eval", "serve"):
        help_text = CliRunner().invoke(main, [command, "--help"]).output
        assert "--allow-spinning / --no-allow-spinning" in help_text, command
