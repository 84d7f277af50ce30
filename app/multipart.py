"""A bounded multipart/form-data reader for uploads (``POST /v1/images/edits``).

Starlette's ``request.form()`` spools every file part whatever its size; here each file part is counted while the
body streams in and the request is refused (413, naming the field) as soon as one passes the upload byte limit, so
an oversized file costs at most that many bytes read. Text fields are bounded too; file fields other than the
expected ones are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


async def read_form(request: Request, file_fields: tuple[str, ...], limits: UploadLimits) -> Form:
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise BadRequest(
            "Send multipart/form-data (curl -F, the openai client's images.edit).", param="Content-Type"
        )
    reader = _Reader(file_fields, limits)
    callbacks = {name: getattr(reader, name) for name in dir(reader) if name.startswith("on_")}
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadRequest(f"Malformed multipart body: {exc}") from None
    return reader.form
