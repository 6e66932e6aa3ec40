"""The package map stays as docs/ARCHITECTURE.md draws it: no import cycles between top-level
packages, click only in the CLI, no product module importing the test fixtures."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(
    p.name
    for p in ROOT.iterdir()
    if (p / "__init__.py").is_file() and p.name not in {"tests", "benchmarks"}
)
# The allowed direction of every edge: a package may import only the ones listed.
ALLOWED = {
    "runtime": set(),
    "flamingo": {"runtime"},
    "exporter": {"runtime", "flamingo"},
    "demo": {"runtime", "flamingo"},
    "trt": {"runtime", "flamingo"},
    "precision": {"runtime", "flamingo", "exporter", "trt", "demo"},
    "bench": {"runtime", "flamingo"},
    "serving": {"runtime", "trt"},
    "fixtures": {"runtime", "flamingo", "demo"},
    # evaluation runs exports torch-free; flamingo only lazily (RICES with a CLIP model, the
    # reference loop of tests and benchmark), demo for the demo task's episodes (torch-free)
    "evaluation": {"runtime", "flamingo", "demo"},
    "cli": {
        "runtime",
        "flamingo",
        "exporter",
        "precision",
        "trt",
        "bench",
        "serving",
        "demo",
        "evaluation",
    },
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def edges() -> dict[str, dict[str, set[str]]]:
    """package -> imported top-level module -> files importing it."""
    out: dict[str, dict[str, set[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for module in imports(path):
                top = module.split(".")[0]
                out[package].setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def test_every_package_is_placed() -> None:
    assert set(PACKAGES) <= set(ALLOWED), f"new package(s) {set(PACKAGES) - set(ALLOWED)}"


def test_packages_import_only_downward() -> None:
    """ALLOWED is a layering (acyclic by construction: checked below), and the code keeps it."""
    wrong = {
        f"{p} -> {top} ({sorted(files)[0]})"
        for p, targets in edges().items()
        for top, files in targets.items()
        if top in PACKAGES and top != p and top not in ALLOWED[p]
    }
    assert not wrong, sorted(wrong)
    order: list[str] = []
    pending = dict(ALLOWED)
    while pending:  # Kahn: a cycle would leave packages that never become ready
        ready = [p for p, deps in pending.items() if deps <= set(order)]
        assert ready, f"cycle among {sorted(pending)}"
        order += sorted(ready)
        for p in ready:
            del pending[p]


def test_click_only_in_cli() -> None:
    offenders = {
        f for p, targets in edges().items() if p != "cli" for f in targets.get("click", set())
    }
    assert not offenders, sorted(offenders)


def test_no_product_module_imports_fixtures() -> None:
    offenders = {
        f
        for p, targets in edges().items()
        if p != "fixtures"
        for f in targets.get("fixtures", set())
    }
    assert not offenders, sorted(offenders)


def test_architecture_page_names_only_what_exists() -> None:
    """docs/ARCHITECTURE.md's module table names every package once and no path that is gone
    (a merge or a move that leaves a stale row fails here)."""
    import re

    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:[a-z_]+/)+[a-z_]*(?:\.py|\.json)?)`", page))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"
    rows = [ln for ln in page.splitlines() if ln.startswith("| `")]
    firsts = [re.findall(r"`([^`]+)`", ln.split("|")[1]) for ln in rows]
    owners = [p for cell in firsts for p in cell]
    repeated = sorted({p for p in owners if owners.count(p) > 1})
    assert not repeated, f"docs/ARCHITECTURE.md has more than one row for {repeated}"
    placed = {p.split("/")[0] for p in owners}
    assert set(PACKAGES) <= placed, f"packages without a row: {set(PACKAGES) - placed}"
