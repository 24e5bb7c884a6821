"""Regenerate the generated sections of README.md and bench/RESULTS.md from the code and the last bench run.

README: the Settings reference, the metrics catalogue and the benchmark table; bench/RESULTS.md: its
headline table (the same as the README's, from ``bench/results.json``: ``bench/headline.py``).
`python scripts/update_readme.py` rewrites the text between the `<!-- BEGIN x -->` / `<!-- END x -->`
markers; `--check` exits 1 when a file is out of date (the unit suite runs the same comparison).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # bench/ belongs to the checkout, not to the installed package

from bench.headline import headline_markdown  # noqa: E402

from btc_anomaly.config import settings_reference_markdown  # noqa: E402
from btc_anomaly.monitoring.catalogue import catalogue_markdown  # noqa: E402

README = ROOT / "README.md"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
SECTIONS: dict[str, Callable[[], str]] = {
    "settings": settings_reference_markdown,
    "metrics": catalogue_markdown,
    "benchmarks": headline_markdown,
}
FILES: dict[Path, Mapping[str, Callable[[], str]]] = {
    README: SECTIONS,
    RESULTS_MD: {"benchmarks": headline_markdown},
}


def render(text: str, sections: Mapping[str, Callable[[], str]] = SECTIONS, name: str = "README.md") -> str:
    for section, make in sections.items():
        pattern = re.compile(rf"(<!-- BEGIN {section} -->\n).*?(<!-- END {section} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{name} has no <!-- BEGIN {section} --> ... <!-- END {section} --> section")
        text = pattern.sub(lambda m, body=make(): m.group(1) + body.rstrip() + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    stale = []
    for path, sections in FILES.items():
        current = path.read_text()
        updated = render(current, sections, path.name)
        if updated == current:
            continue
        if "--check" in argv:
            stale.append(path.relative_to(ROOT))
        else:
            path.write_text(updated)
    if stale:
        print(
            f"generated sections are stale in {', '.join(map(str, stale))}: run `make readme`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
