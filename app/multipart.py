"""A bounded multipart/form-data reader for uploads (``POST /v1/images/edits``).

Starlette's ``request.form()`` spools every file part whatever its size; here each file part is counted while the
body streams in and the request is refused (413, naming the field) as soon as one passes the upload byte limit, so
an oversized file costs at most that many bytes read. Text fields are bounded too; file fields other than the
expected ones are refused.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import BadRequest, TooLarge
from app.uploads import UploadLimits, check_byte_count

MAX_TEXT_BYTES = 64 * 1024  # a prompt is at most 8000 characters
MAX_PARTS = 64


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # the first part of each file field


class _Reader:
    def __init__(self, file_fields: tuple[str, ...], limits: UploadLimits) -> None:
        self.file_fields, self.limits = file_fields, limits
        self.form = Form()
        self.parts = 0
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._keep = True
        self._buf = bytearray()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(f"A form may have at most {MAX_PARTS} parts.")
        self._disposition, self._buf = b"", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadRequest("Every form part needs a Content-Disposition name.")
        name = options[b"name"].decode("utf-8", "replace")
        self._is_file = b"filename" in options
        # OpenAI's client sends a list of images as `image[]`; the first one is the image to edit
        self._name = name[:-2] if self._is_file and name.endswith("[]") else name
        if self._is_file and self._name not in self.file_fields:
            raise BadRequest(
                f"Unexpected file field {name!r}; files go in {', '.join(self.file_fields)}.", param=name
            )
        self._keep = self._name not in (self.form.files if self._is_file else self.form.fields)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = len(self._buf) + end - start
        if self._is_file:
            check_byte_count(n, self._name, self.limits)  # type: ignore[arg-type]
        elif n > MAX_TEXT_BYTES:
            raise TooLarge(f"{self._name} is over {MAX_TEXT_BYTES} bytes.", param=self._name)
        if self._keep:
            self._buf += data[start:end]

    def on_part_end(self) -> None:
        if not self._keep:
            return
        if self._is_file:
            self.form.files[self._name] = bytes(self._buf)
        else:
            self.form.fields[self._name] = self._buf.decode("utf-8", "replace")


async def _feed(request: Request, boundary: bytes, reader: Any) -> None:
    """Stream the body through python-multipart into ``reader``'s ``on_*`` callbacks."""
    callbacks = {name: getattr(reader, name) for name in dir(reader) if name.startswith("on_")}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    async for chunk in request.stream():
        parser.write(chunk)
    parser.finalize()


async def read_form(request: Request, file_fields: tuple[str, ...], limits: UploadLimits) -> Form:
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise BadRequest(
            "Send multipart/form-data (curl -F, the openai client's images.edit).", param="Content-Type"
        )
    reader = _Reader(file_fields, limits)
    try:
        await _feed(request, options[b"boundary"], reader)
    except FormParserError as exc:
        raise BadRequest(f"Malformed multipart body: {exc}") from None
    return reader.form


@dataclass
class DiskForm:
    """A form whose one file field went straight to a temp file (`path`, None when the field was absent)."""

    fields: dict[str, str]
    path: Path | None
    filename: str


class _DiskReader(_Reader):
    """One large file field written to disk as it streams in (memory bounded by the parser's chunk size); past
    `max_bytes` the request is refused with 413 before the rest of the body is read."""

    def __init__(self, file_field: str, folder: Path, max_bytes: int) -> None:
        super().__init__((file_field,), UploadLimits())
        self.file_field, self.folder, self.max_bytes = file_field, folder, max_bytes
        self.path: Path | None = None
        self.filename = ""
        self._fh: Any = None
        self._written = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._is_file and self._keep:
            _, options = parse_options_header(self._disposition)
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=self.folder)
            self._fh, self.path = os.fdopen(fd, "wb"), Path(tmp)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file:
            return super().on_part_data(data, start, end)
        self._written += end - start
        if self._written > self.max_bytes:
            raise TooLarge(
                f"{self._name} is over the upload limit of {self.max_bytes} bytes.", param=self._name
            )
        if self._keep and self._fh is not None:
            self._fh.write(data[start:end])

    def on_part_end(self) -> None:
        if not self._is_file:
            return super().on_part_end()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._keep = False

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


async def read_form_to_disk(request: Request, file_field: str, folder: Path, max_bytes: int) -> DiskForm:
    """`file_field` streamed into a temp file under `folder` (the caller moves or deletes it); the other fields
    as text. A refused or broken request leaves no temp file behind."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise BadRequest(
            f"Send multipart/form-data with the file in {file_field!r} (curl -F).", param="Content-Type"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + MAX_PARTS * MAX_TEXT_BYTES:
        raise TooLarge(f"{file_field} is over the upload limit of {max_bytes} bytes.", param=file_field)
    reader = _DiskReader(file_field, folder, max_bytes)
    try:
        await _feed(request, options[b"boundary"], reader)
    except FormParserError as exc:
        reader.discard()
        raise BadRequest(f"Malformed multipart body: {exc}") from None
    except BaseException:
        reader.discard()
        raise
    bad = next((k for k, v in reader.form.fields.items() if "\x00" in v), None)
    if bad is not None or "\x00" in reader.filename:
        reader.discard()
        raise BadRequest("NUL characters are not allowed in form fields.", param=bad or file_field)
    return DiskForm(reader.form.fields, reader.path, reader.filename)
