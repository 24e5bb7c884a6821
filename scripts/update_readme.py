"""Regenerate the README's reference sections from the code: Settings and the metrics catalogue.

`python scripts/update_readme.py` rewrites the text between the `<!-- BEGIN x -->` / `<!-- END x -->`
markers; `--check` exits 1 when the README is out of date (the unit suite runs that check).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from btc_anomaly.config import settings_reference_markdown
from btc_anomaly.monitoring.catalogue import catalogue_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS: dict[str, Callable[[], str]] = {
    "settings": settings_reference_markdown,
    "metrics": catalogue_markdown,
}


def render(text: str) -> str:
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- BEGIN {name} --> ... <!-- END {name} --> section")
        text = pattern.sub(lambda m, body=make(): m.group(1) + body.rstrip() + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    current = README.read_text()
    updated = render(current)
    if "--check" in argv:
        if updated != current:
            print("README.md reference sections are stale: run `make readme`", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
