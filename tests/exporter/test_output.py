"""Atomic export folders (exporter/output.py): one writer per OUT, SIGTERM unwinds, killed
writers' folders reclaimed, OUT replaced so that the old or the new export is always there
(renameat2 exchange, and the two-rename fallback repaired after a crash), the umask's mode,
a full disk as an ExportError."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import exporter.output as output
from exporter.output import (
    OWNER_FILE,
    ExportError,
    check_free_space,
    check_output,
    output_lock,
    reclaim_stale,
    write_atomically,
)

ROOT = Path(__file__).resolve().parents[2]


def _build(files: dict[str, str]):
    def build(tmp: Path) -> str:
        for name, text in files.items():
            (tmp / name).write_text(text)
        return "built"

    return build


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, **kw)


def test_write_publish_and_replace(tmp_path) -> None:
    out = tmp_path / "OUT"
    assert write_atomically(out, False, _build({"a": "1"})) == "built"
    assert (out / "a").read_text() == "1" and not (out / OWNER_FILE).exists()
    with pytest.raises(ExportError, match="already exists; pass --force"):
        write_atomically(out, False, _build({"a": "2"}))
    write_atomically(out, True, _build({"b": "2"}))
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["OUT"]  # no temporary, old or lock left


def test_the_fallback_replace_and_its_crash_window(tmp_path, monkeypatch) -> None:
    """Without renameat2 OUT is replaced by two renames; a writer killed between them leaves
    no OUT, and the next writer puts the old export back before anything else."""
    out = tmp_path / "OUT"
    write_atomically(out, False, _build({"old": "1"}))
    monkeypatch.setattr(output, "renameat2", lambda *a: False)
    write_atomically(out, True, _build({"new": "1"}))
    assert [p.name for p in out.iterdir()] == ["new"]
    crash = _python(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import exporter.output as output
        output.renameat2 = lambda *a: False
        real, calls = os.rename, []
        def rename(src, dst):
            calls.append(src)
            if len(calls) == 2:  # between OUT -> .OUT.old-* and tmp -> OUT
                os._exit(9)
            real(src, dst)
        os.rename = rename
        def build(tmp):
            (tmp / "newer").write_text("1")
        output.write_atomically(output.Path({str(out)!r}), True, build)
    """)
    assert crash.wait() == 9
    assert not out.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(".OUT.old-") for n in left) and any(".OUT.tmp-" in n for n in left)
    notes: list[str] = []
    with output_lock(out):
        reclaim_stale(out, notes.append)
    assert [p.name for p in out.iterdir()] == ["new"]  # the last complete export is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]  # tmp reclaimed, lock gone
    assert any("restored" in n for n in notes)


def test_exchange_keeps_out_present_at_every_instant(tmp_path) -> None:
    """With renameat2(RENAME_EXCHANGE) OUT never disappears: a watcher polling OUT during
    repeated --force replacements always finds it (the two-rename fallback would not)."""
    out = tmp_path / "OUT"
    write_atomically(out, False, _build({"x": "0"}))
    if not output.renameat2(out, out, output.RENAME_EXCHANGE):
        pytest.skip("this filesystem has no renameat2 exchange")
    watcher = _python(f"""
        import os, time
        end, bad = time.time() + 2.0, 0
        while time.time() < end:
            try:
                os.lstat({str(out)!r})
            except FileNotFoundError:
                bad += 1
        print(bad)
    """, stdout=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 1.5
    while time.time() < deadline:
        write_atomically(out, True, _build({"x": "1"}))
    assert watcher.communicate()[0].strip() == "0"


def test_one_writer_per_out(tmp_path) -> None:
    out = tmp_path / "OUT"
    holder = _python(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from exporter.output import output_lock, Path
        with output_lock(Path({str(out)!r})):
            print("locked", flush=True)
            time.sleep(60)
    """, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ExportError, match=rf"being written by another .*\(pid {holder.pid}\)"):
        write_atomically(out, False, _build({"a": "1"}))
    with pytest.raises(ExportError, match="being written by another"):
        output.check_output(out, False)  # refused before any slow work too
    holder.kill()  # SIGKILL: the kernel drops the lock; the lock file stays
    holder.wait()
    assert (tmp_path / ".OUT.lock").exists()
    write_atomically(out, False, _build({"a": "1"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
    with output_lock(out), output_lock(out):  # re-entrant within a process
        pass


def test_stale_folders_of_dead_writers_are_reclaimed(tmp_path) -> None:
    out = tmp_path / "OUT"
    dead, alive = _dead_pid(), os.getpid()
    host = os.uname().nodename

    def folder(name: str, owner: dict | None) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "part.onnx").write_text("partial")
        if owner is not None:
            (path / OWNER_FILE).write_text(json.dumps(owner))
        return path

    gone = [
        folder(f".OUT.tmp-{dead}-a", {"pid": dead, "host": host, "start_time": "1"}),
        folder(f".OUT.fp32-{dead}-b", None),  # killed before its owner file was written
        folder(f".OUT.tmp-{alive}-c", {"pid": alive, "host": host, "start_time": "0"}),  # reused
    ]
    kept = [
        folder(
            f".OUT.tmp-{alive}-d",
            {"pid": alive, "host": host, "start_time": output._start_time(alive)},
        ),
        folder(f".OUT.tmp-{dead}-e", {"pid": dead, "host": "another-host"}),
        folder(f".OTHER.tmp-{dead}-f", None),  # another OUT's
        folder(".OUT.tmp-oldstyle", None),  # no PID: not ours to judge
    ]
    notes: list[str] = []
    write_atomically(out, False, _build({"a": "1"}), notes.append)
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in kept)
    assert sum("left by a killed writer" in n for n in notes) == 3
    assert any("another host" in n for n in notes)


def test_sigterm_unwinds_and_removes_the_temporary_folder(tmp_path) -> None:
    out = tmp_path / "OUT"
    writer = _python(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from exporter.output import write_atomically, Path
        def build(tmp):
            (tmp / "part").write_text("x")
            print("writing", flush=True)
            time.sleep(60)
        write_atomically(Path({str(out)!r}), False, build)
    """, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert writer.stdout.readline().strip() == "writing"
    assert any(".OUT.tmp-" in p.name for p in tmp_path.iterdir())
    writer.send_signal(signal.SIGTERM)
    assert writer.wait() == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_published_folder_has_mkdirs_mode(tmp_path, umask, mode) -> None:
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "OUT", False, _build({"a": "1"}))
    finally:
        os.umask(previous)
    assert (tmp_path / "OUT").stat().st_mode & 0o777 == mode


def test_full_disk_is_an_export_error(tmp_path) -> None:
    def fill(tmp: Path) -> None:
        (tmp / "graph.onnx").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "graph.onnx"))

    with pytest.raises(ExportError, match=r"cannot write .*OUT: No space left on device \(wrote"):
        write_atomically(tmp_path / "OUT", False, fill)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match=r"not enough space for .*needs about .* MiB free"):
        check_free_space(tmp_path / "OUT", 1 << 60)

    def read_fails(tmp: Path) -> None:  # not a write error: stays what it is
        raise FileNotFoundError(errno.ENOENT, "gone", "/nonexistent/input.json")

    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "OUT", False, read_fails)


def test_file_size_limit_through_the_cli(tiny_export, tmp_path) -> None:
    """A real write failure (RLIMIT_FSIZE: EFBIG) in `quantize`: one line, exit 1, no
    traceback, nothing left."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from cli.main import main; sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "quantize", str(tiny_export("mpt")), "--precision", "fp16",
         "-o", str(tmp_path / "q")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "Error: cannot write" in result.stderr and "File too large" in result.stderr
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())", *args],
        cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_out_that_would_delete_what_the_user_has_is_refused(tiny_paths, tmp_path) -> None:
    """`-o ''` (an unset shell variable), `-o .`, a folder holding the current one, a folder
    holding an input, and a symbolic link are refused with --force before any work, one line,
    and nothing is touched (`-o '' --force` used to replace the current folder)."""
    p = tiny_paths("mpt")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "precious.txt").write_text("keep")
    model = ["--lm", str(p.lm_dir), "--vision", str(p.vision_path),
             "--checkpoint", str(p.checkpoint_path)]  # fmt: skip
    (work / "link").symlink_to(work / "sub")
    (work / "dangling").symlink_to(work / "nowhere")
    cases = {
        "": (work, "is the current folder"),
        ".": (work, "is the current folder"),
        "..": (work / "sub", "is the current folder"),
        str(p.root): (work, f"holds the input {p.lm_dir}"),
        str(p.lm_dir): (work, f"holds the input {p.lm_dir}"),
        "link": (work, "is a symbolic link"),
        "dangling": (work, "is a symbolic link"),
    }
    before = sorted(str(q) for q in tmp_path.rglob("*"))
    for out, (cwd, message) in cases.items():
        result = _cli("export", *model, "-o", out, "--force", cwd=cwd)
        assert result.returncode == 1, (out, result.stderr)
        assert "Traceback" not in result.stderr
        assert message in result.stderr, (out, result.stderr)
    assert sorted(str(q) for q in tmp_path.rglob("*")) == before
    assert (work / "precious.txt").read_text() == "keep" and p.lm_dir.is_dir()


def test_quantize_refuses_an_out_holding_its_source(tiny_export, tmp_path) -> None:
    src = tmp_path / "parent" / "fp32"
    shutil.copytree(tiny_export("mpt"), src)  # the source export inside OUT
    result = _cli("quantize", str(src), "--precision", "fp16", "-o", str(src.parent),
                  "--force", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"holds the input {src}" in result.stderr
    assert src.exists()


def test_an_output_holding_where_an_inputs_links_point_is_refused(tmp_path) -> None:
    """A Hugging Face cache snapshot's files are links into blobs/: `-o hf/blobs --force`
    would delete the model being read (breaker pass); the link targets count as inputs."""
    blobs = tmp_path / "hf" / "blobs"
    snapshot = tmp_path / "hf" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "1234").write_text("{}")
    (snapshot / "config.json").symlink_to("../../blobs/1234")
    for out, words in (
        (blobs, r"holds the input .*abc \(its file .*blobs/1234\)"),
        (tmp_path / "hf", r"holds the input .*snapshots/abc: write"),
    ):
        with pytest.raises(ExportError, match=words):
            check_output(out, True, inputs=[snapshot])
    check_output(tmp_path / "elsewhere", True, inputs=[snapshot])  # an unrelated OUT is fine
    assert (blobs / "1234").read_text() == "{}"
