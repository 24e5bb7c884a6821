"""Audit the pinned requirements against the vulnerabilities PyPI publishes.

    .venv/bin/python scripts/audit_requirements.py [requirements/*.txt]

pip-audit's PyPI service asks ``/pypi/<name>/<version>/json`` and its OSV service asks api.osv.dev; the
registry this project reaches answers neither, only ``/pypi/<name>/json``. That answer lists the known
vulnerabilities of the project's newest release, each with the versions that fix it. So the audit:

- fails for a pin that is affected by a listed vulnerability: the pin is the newest release, or a
  ``fixed_in`` version is above the pin (then upgrading fixes it), unless ``requirements/audit-allow.txt``
  names the advisory id with a reason;
- reports, without failing, the pins that are older than the newest release: a vulnerability fixed
  between the pin and the newest release is no longer listed, so those pins are not proven clean.

Exit status: 0 clean, 1 an affected pin, 2 PyPI could not be asked (an audit that could not run is not
a pass).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
ALLOW_FILE = ROOT / "requirements" / "audit-allow.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#\\]+)")


@dataclass
class Finding:
    name: str
    pinned: str
    newest: str
    affected: list[str] = field(default_factory=list)  # advisory ids that apply to the pin
    allowed: list[str] = field(default_factory=list)  # ... of those, the ones allow-listed with a reason


def read_pins(files: Iterable[Path]) -> dict[str, str]:
    """``name -> version`` over every pin of ``files`` (names normalised as PyPI does)."""
    pins: dict[str, str] = {}
    for path in files:
        for line in path.read_text().splitlines():
            match = PIN.match(line.strip())
            if match:
                pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def read_allowed(path: Path = ALLOW_FILE) -> dict[str, str]:
    """``advisory id -> reason`` from lines ``ID  reason``; a line without a reason is an error."""
    allowed: dict[str, str] = {}
    if not path.exists():
        return allowed
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        advisory, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: {advisory} needs a reason")
        allowed[advisory] = reason.strip()
    return allowed


def assess(name: str, pinned: str, project: Mapping, allowed: Mapping[str, str]) -> Finding:
    """Which of the advisories PyPI lists for ``project`` apply to ``pinned``."""
    newest = str(project["info"]["version"])
    finding = Finding(name, pinned, newest)
    try:
        pin = Version(pinned)
    except InvalidVersion:
        pin = None
    for advisory in project.get("vulnerabilities") or []:
        if advisory.get("withdrawn"):
            continue
        fixes = []
        for fixed in advisory.get("fixed_in") or []:
            try:
                fixes.append(Version(fixed))
            except InvalidVersion:
                continue
        # The list describes the newest release: it applies to the pin when the pin is that release, or
        # when a fix exists above the pin (the pin predates the fix).
        applies = pinned == newest or (pin is not None and any(fix > pin for fix in fixes))
        if applies:
            finding.affected.append(advisory["id"])
            if advisory["id"] in allowed or any(alias in allowed for alias in advisory.get("aliases") or []):
                finding.allowed.append(advisory["id"])
    return finding


def fetch_project(name: str, index: str, timeout: float) -> Mapping:
    with urllib.request.urlopen(f"{index}/{name}/json", timeout=timeout) as response:
        return json.load(response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "files", nargs="*", type=Path, help="pinned requirement files (default: requirements/*.txt)"
    )
    parser.add_argument("--index", default="https://pypi.org/pypi", help="PyPI JSON API root")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    files = args.files or sorted((ROOT / "requirements").glob("*.txt"))
    files = [path for path in files if path.name != ALLOW_FILE.name]
    pins = read_pins(files)
    allowed = read_allowed()

    def one(item: tuple[str, str]) -> Finding | str:
        name, version = item
        try:
            return assess(name, version, fetch_project(name, args.index, args.timeout), allowed)
        except (urllib.error.URLError, TimeoutError, ValueError, KeyError) as error:
            return f"{name}=={version}: {error}"

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, sorted(pins.items())))
    errors = [result for result in results if isinstance(result, str)]
    findings = [result for result in results if isinstance(result, Finding)]
    affected = [f for f in findings if set(f.affected) - set(f.allowed)]
    behind = [f for f in findings if f.pinned != f.newest]

    print(f"audited {len(pins)} pins from {', '.join(path.name for path in files)} against {args.index}")
    for finding in findings:
        for advisory in finding.allowed:
            print(
                f"  allowed   {finding.name}=={finding.pinned} {advisory}: {allowed.get(advisory, 'alias')}"
            )
    for finding in affected:
        open_ids = sorted(set(finding.affected) - set(finding.allowed))
        print(
            f"  AFFECTED  {finding.name}=={finding.pinned} (newest {finding.newest}): {', '.join(open_ids)}"
        )
    print(
        f"  {len(findings) - len(behind)} pins are the newest release and were checked against its advisories"
    )
    if behind:
        print(
            f"  {len(behind)} pins are older than the newest release (only advisories with a later fix are seen):"
        )
        print("    " + ", ".join(f"{f.name} {f.pinned}<{f.newest}" for f in behind))
    for error in errors:
        print(f"  ERROR     {error}")
    if errors:
        return 2
    return 1 if affected else 0


if __name__ == "__main__":
    sys.exit(main())
