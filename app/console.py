"""The web console: hand-written static files (``app/console/``) at ``/console/``; ``/`` redirects there.

The page talks to the service only through the public REST API with the user's key, so it needs no auth of its own.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

FOLDER = Path(__file__).with_name("console")


def mount(app: FastAPI) -> None:
    app.mount("/console", StaticFiles(directory=FOLDER, html=True), name="console")
    app.add_api_route("/", lambda: RedirectResponse("/console/"), include_in_schema=False)
