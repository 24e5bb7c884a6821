"""Just enough PromQL handling to check dashboards and alert rules against the metrics catalogue.

* :func:`metric_names` — the metric names an expression selects (not functions, keywords or labels);
* :func:`as_bool` — an alert expression with ``bool`` after each comparison, so it returns its 0/1
  signal whether or not the alert would fire (the threshold filter otherwise returns nothing);
* :func:`dashboard_queries` / :func:`rule_queries` — every expression of the Grafana dashboards and the
  rule files, with where it came from.

Not a parser: it relies on the expressions being well formed, which ``promtool`` and Prometheus check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}


def strip_literals(expr: str) -> str:
    """The expression without strings, label matchers, ranges and grouping label lists."""
    out = _STRING.sub('""', expr)
    out = _BRACES.sub("{}", out)
    out = _BRACKETS.sub("[]", out)
    return _GROUPING.sub(" ", out)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by ``expr`` (also ``{__name__="..."}`` selectors)."""
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    for m in _IDENT.finditer(strip_literals(expr)):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def substitute_grafana(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace Grafana's built-in variables so Prometheus can run the query."""
    values = {**_GRAFANA_VARS, **(values or {})}
    for var in sorted(values, key=len, reverse=True):
        expr = expr.replace(var, values[var])
    return expr


def as_bool(expr: str) -> str:
    """Add the ``bool`` modifier to every comparison outside label matchers and strings."""
    out: list[str] = []
    i, n, depth = 0, len(expr), 0
    while i < n:
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            out.append(expr[i : j + 1])
            i = j + 1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        if depth == 0 and c in "=!<>":
            two = expr[i : i + 2]
            op = two if two in ("==", "!=", ">=", "<=") else (c if c in "<>" else None)
            if op is not None:
                out.append(op)
                i += len(op)
                if not re.match(r"\s*bool\b", expr[i:]):
                    out.append(" bool")
                continue
        out.append(c)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Query:
    source: str  # file name
    where: str  # "dashboard title / panel title [refId]" or "group / alert"
    expr: str
    kind: str  # "panel" | "alert" | "record"


def dashboard_queries(folder: Path) -> Iterator[Query]:
    for path in sorted(folder.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                yield Query(
                    path.name,
                    f"{board.get('title')} / {panel.get('title')} [{target.get('refId')}]",
                    target.get("expr", ""),
                    "panel",
                )


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside collapsed rows


def rule_queries(path: Path) -> Iterator[Query]:
    import yaml

    doc = yaml.safe_load(path.read_text())
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            yield Query(
                path.name,
                f"{group['name']} / {name}",
                str(rule["expr"]).strip(),
                "alert" if "alert" in rule else "record",
            )
