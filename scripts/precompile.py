"""Byte-compile what the service, its workers, the trainer and the demo import (`make venv` runs this).

    python -m scripts.precompile          # the entry points below and everything they import
    python -m scripts.precompile --all    # every module of the environment (`make test`: the tests load far more)

`make venv` installs with `pip --no-compile`: pip would otherwise byte-compile every module of every package
(about 17,000 files, half of the install's time on a 2-core machine), most of which nothing here ever imports.
Importing the entry points below with bytecode writing on caches exactly what they load, so every later process
starts from `.pyc` files even where PYTHONDONTWRITEBYTECODE is set. A module none of them loads still works: Python
compiles it in memory when it is first imported (a slower start for that process, nothing else).
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

# The processes of `hdm serve` in embedded mode, of a Celery worker and of a training job (torchrun, the trainer,
# its DataLoader workers), and what `make demo` itself runs.
ENTRY_MODULES = (
    "worker.tasks",  # first: it points prometheus-client at its multiprocess folder before anything imports it
    "worker.embedded",
    "worker.images",
    "worker.training",
    "worker.datasets",
    "app.main",
    "app.cli",
    "hdm_core.train.__main__",
    "hdm_core.pipeline",
    "hdm_core.adapters",
    "torch.distributed.run",
    "uvicorn.loops.auto",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on",
    "scripts.demo",
    "hdm_demo.assets",
    "hdm_demo.scoring",
)


def compile_imports(modules: Iterable[str]) -> None:
    """Import `modules` with bytecode writing on: Python caches every module they load, as it would by default."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = False  # the point of this script, whatever PYTHONDONTWRITEBYTECODE says
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        sys.dont_write_bytecode = before


def compile_all(folder: str | Path) -> None:
    """Every module under `folder`, as pip's own compile step: a file that does not compile on this Python (e.g. a
    package's test written for a newer one) is skipped, not an error."""
    compileall.compile_dir(str(folder), quiet=2, workers=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every module under site-packages, as pip would")
    if p.parse_args().all:
        compile_all(sysconfig.get_paths()["purelib"])
    else:
        compile_imports(ENTRY_MODULES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
