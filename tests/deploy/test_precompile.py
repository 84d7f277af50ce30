"""`make venv` installs with pip --no-compile and byte-compiles through scripts/precompile.py: what it writes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from scripts.precompile import ENTRY_MODULES, compile_all

ROOT = Path(__file__).resolve().parents[2]


def _cached(source: Path) -> bool:
    return Path(importlib.util.cache_from_source(str(source))).is_file()


def _package(root: Path) -> dict[str, Path]:
    pkg = root / "precompile_probe"
    pkg.mkdir()
    files = {
        "init": pkg / "__init__.py",
        "used": pkg / "used.py",
        "unused": pkg / "unused.py",
        "broken": pkg / "broken.py",
    }
    files["init"].write_text("from . import used\n")
    files["used"].write_text("VALUE = 1\n")
    files["unused"].write_text("VALUE = 2\n")
    files["broken"].write_text("def f(:\n")  # not valid Python: must be skipped, not fail the install
    return files


def test_imports_are_cached_even_with_dontwritebytecode(tmp_path):
    files = _package(tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import scripts.precompile as p; "
        "p.compile_imports(['precompile_probe']); assert sys.dont_write_bytecode"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert _cached(files["init"]) and _cached(files["used"])
    assert not _cached(files["unused"])  # only what the entry points load


def test_all_compiles_everything_and_skips_what_does_not_compile(tmp_path):
    files = _package(tmp_path)
    compile_all(tmp_path)
    assert all(_cached(files[k]) for k in ("init", "used", "unused"))
    assert not _cached(files["broken"])


def test_entry_modules_exist():
    missing = [m for m in ENTRY_MODULES if importlib.util.find_spec(m) is None]
    assert not missing
