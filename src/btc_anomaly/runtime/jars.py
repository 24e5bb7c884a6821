"""Locating the JVM jars that `make jars` resolved from jvm/pom.xml."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_VERSION_SUFFIX = re.compile(r"-\d[\w.\-]*\.jar$")


class JarsMissing(RuntimeError):
    pass


def jar_dir(jars_root: Path, group: str) -> Path:
    """The folder of one pom.xml profile (`kafka` or `spark`), checked to hold jars."""
    folder = jars_root / group
    if not any(folder.glob("*.jar")):
        raise JarsMissing(f"no jars in {folder}: run `make jars` (resolves jvm/pom.xml with Maven)")
    return folder


def artifact_name(jar: Path) -> str:
    """`jackson-core-2.13.5.jar` -> `jackson-core`."""
    return _VERSION_SUFFIX.sub("", jar.name)


def java_executable() -> str:
    java = shutil.which("java")
    if java is None:
        raise JarsMissing("no `java` on PATH: install a Java 17+ runtime (make setup does on Debian)")
    return java
