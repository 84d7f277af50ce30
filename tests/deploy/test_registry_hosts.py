"""No package registry's host name appears in the project (DEVELOPERS.md): pip's default index needs no URL and
another index is a build argument without a default."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

REGISTRY_HOSTS = re.compile(
    r"pypi\.org|pythonhosted\.org|download\.pytorch\.org|registry\.npmjs\.org|crates\.io|deb\.debian\.org"
    r"|archive\.ubuntu\.com|anaconda\.(org|com)|ghcr\.io|nvcr\.io|docker\.io|huggingface\.co",
    re.IGNORECASE,
)


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_registry_host_in_tracked_files() -> None:
    hits = []
    for path in _tracked_files():
        if not path.is_file() or path.suffix in {".safetensors", ".png", ".jpg", ".webp"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if path.name != Path(__file__).name and REGISTRY_HOSTS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "package registry host names in the project:\n" + "\n".join(hits)


def test_dockerfile_index_url_is_an_argument_without_default() -> None:
    text = (ROOT / "Dockerfile").read_text()
    args = re.findall(r"^ARG\s+TORCH_INDEX_URL(=.*)?$", text, flags=re.MULTILINE)
    assert args == [""], f"TORCH_INDEX_URL must be declared once without a default, got {args}"
    assert "--extra-index-url" not in text
