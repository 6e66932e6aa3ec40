"""Findings of the TensorRT checks and their report: grouped per graph, as text or JSON."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .parser_tables import RULES
from .profiles import Limits

ERROR, WARNING = "error", "warning"
RULE_ORDER = (
    "decoder-form",
    "opset",
    "operators",
    "constant-inputs",
    "quantization",
    "dtypes",
    "int64",
    "profiles",
)


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    subject: str  # op type, tensor name or dim name the finding is about
    message: str
    where: str = ""  # node or tensor name

    def key(self) -> tuple[str, str, str, str]:
        return (self.rule, self.severity, self.subject, self.message)


@dataclass
class GroupedFinding:
    """Findings with the same rule/subject/message, counted (24 LayerNorms are one line)."""

    rule: str
    severity: str
    subject: str
    message: str
    count: int
    examples: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "subject": self.subject,
            "message": self.message,
            "count": self.count,
            "examples": self.examples,
        }


def group(findings: Iterable[Finding], examples: int = 3) -> list[GroupedFinding]:
    out: dict[tuple[str, str, str, str], GroupedFinding] = {}
    for f in findings:
        g = out.get(f.key())
        if g is None:
            g = out[f.key()] = GroupedFinding(f.rule, f.severity, f.subject, f.message, 0, [])
        g.count += 1
        if f.where and len(g.examples) < examples and f.where not in g.examples:
            g.examples.append(f.where)
    order = {r: i for i, r in enumerate(RULE_ORDER)}
    return sorted(
        out.values(), key=lambda g: (order.get(g.rule, 99), g.severity != ERROR, g.subject)
    )


@dataclass
class GraphReport:
    name: str
    file: str
    opset: int
    nodes: int
    findings: list[GroupedFinding]

    @property
    def errors(self) -> int:
        return sum(f.count for f in self.findings if f.severity == ERROR)

    @property
    def warnings(self) -> int:
        return sum(f.count for f in self.findings if f.severity == WARNING)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "opset": self.opset,
            "nodes": self.nodes,
            "errors": self.errors,
            "warnings": self.warnings,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class CheckReport:
    version: str
    limits: Limits
    graphs: list[GraphReport]

    @property
    def errors(self) -> int:
        return sum(g.errors for g in self.graphs)

    @property
    def warnings(self) -> int:
        return sum(g.warnings for g in self.graphs)

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict[str, Any]:
        rules = RULES[self.version]
        return {
            "trt_version": self.version,
            "release": rules.release,
            "source": rules.source,
            "limits": self.limits.to_dict(),
            "ok": self.ok,
            "errors": self.errors,
            "warnings": self.warnings,
            "graphs": {g.name: g.to_dict() for g in self.graphs},
        }

    def format(self) -> str:
        rules = RULES[self.version]
        lines = [
            f"TensorRT {self.version}: {rules.release}",
            f"  rules from {rules.source}",
            "  profiles for max_batch {max_batch}, max_images {max_images}, "
            "max_seq_len {max_seq_len}".format(**self.limits.to_dict()),
        ]
        for g in self.graphs:
            lines.append("")
            status = "ok" if not g.findings else f"{g.errors} error(s), {g.warnings} warning(s)"
            lines.append(f"{g.file}  (opset {g.opset}, {g.nodes} nodes): {status}")
            rule = None
            for f in g.findings:
                if f.rule != rule:
                    rule = f.rule
                    lines.append(f"  [{rule}]")
                times = f" x{f.count}" if f.count > 1 else ""
                lines.append(f"    {f.severity.upper():<7} {f.subject}{times}: {f.message}")
                if f.examples:
                    lines.append(f"            e.g. {', '.join(f.examples)}")
        lines.append("")
        verdict = (
            f"PASS: parsable by TensorRT {self.version} as far as static checks can tell"
            if self.ok
            else f"FAIL: TensorRT {self.version} would refuse or mis-build these graphs"
        )
        lines.append(f"{verdict} ({self.errors} error(s), {self.warnings} warning(s))")
        return "\n".join(lines)
