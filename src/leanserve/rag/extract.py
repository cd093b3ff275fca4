"""The text of an uploaded file, for chunking: plain text and Markdown as they are, HTML's
visible text, JSON's values with their keys, PDF's text layer (pypdf).

The type comes from the file name's extension, else from the MIME type, else from the
bytes (`%PDF-`, or text that decodes). Text is UTF-8 (a BOM is honoured), falling back to
Windows-1252, which decodes what older editors write. A type this cannot read raises
`UnsupportedFile`; a file of a readable type that is empty, corrupt or has no text raises
`InvalidFile`. Both carry a reason a user can act on (it becomes the file's last_error).
"""
from __future__ import annotations

import codecs
import io
import json
import re
from html.parser import HTMLParser
from pathlib import PurePosixPath

SUPPORTED = "plain text, Markdown, HTML, JSON and PDF"
TEXT_EXTENSIONS = {
    ".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".tsv", ".log", ".xml", ".yaml", ".yml", ".toml",
    ".ini", ".cfg", ".tex", ".py", ".js", ".ts", ".java", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".go",
    ".rs", ".rb", ".php", ".sh", ".sql", ".css",
}
KINDS = {".html": "html", ".htm": "html", ".xhtml": "html", ".json": "json", ".pdf": "pdf"}
MIME_KINDS = {"text/html": "html", "application/xhtml+xml": "html", "application/json": "json",
              "application/pdf": "pdf"}


class UnsupportedFile(Exception):
    """The file's type is not one this server extracts text from."""


class InvalidFile(Exception):
    """The file is of a readable type but empty, corrupt or without text."""


def extract_text(data: bytes, filename: str, mime: str | None = None) -> str:
    if not data:
        raise InvalidFile(f"{filename} is empty")
    kind = _kind(data, filename, mime)
    if kind == "pdf":
        text = _pdf(data, filename)
    else:
        text = decode(data, filename)
        if kind == "html":
            text = html_text(text)
        elif kind == "json":
            text = json_text(text, filename)
    if not text.strip():
        raise InvalidFile(f"{filename} has no text" + (" (a scanned PDF needs OCR, which this server does not do)"
                                                        if kind == "pdf" else ""))
    return text


def _kind(data: bytes, filename: str, mime: str | None) -> str:
    ext = PurePosixPath(filename.lower()).suffix
    if ext in KINDS:
        return KINDS[ext]
    if ext in TEXT_EXTENSIONS:
        return "text"
    base = (mime or "").split(";")[0].strip().lower()
    if base in MIME_KINDS:
        return MIME_KINDS[base]
    if base.startswith("text/"):
        return "text"
    if data.startswith(b"%PDF-"):
        return "pdf"
    if _looks_textual(data):
        return "text"
    what = f"'{ext}' files" if ext else "binary files"
    raise UnsupportedFile(f"{filename}: {what} are not supported; this server reads {SUPPORTED}")


def _looks_textual(data: bytes) -> bool:
    head = data[:8192]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    return b"\x00" not in head and _decodes(head)


def _decodes(head: bytes) -> bool:
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end of the sample is fine
        return e.start >= len(head) - 3


def decode(data: bytes, filename: str) -> str:
    """UTF-8 (or UTF-16 with a BOM), else Windows-1252; InvalidFile if neither fits."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise InvalidFile(f"{filename} is not text in UTF-8 or Windows-1252")


class _Visible(HTMLParser):
    """Collects the text a browser shows (and the title): no scripts, styles or templates;
    each block on its own line."""

    HIDDEN = {"script", "style", "template", "noscript", "svg"}
    BLOCKS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
              "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "title", "dt", "dd", "hr", "main", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in self.HIDDEN
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN and self.hidden:
            self.hidden -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def html_text(html: str) -> str:
    parser = _Visible()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"\s+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    return "\n".join(line for line in lines if line)


def json_text(text: str, filename: str) -> str:
    """One line per value, `path.to[0].key: value`, so a chunk keeps the keys of its values."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidFile(f"{filename} is not valid JSON: {e}") from None
    lines: list[str] = []

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif value is not None:
            shown = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"{path}: {shown}" if path else shown)

    walk(doc, "")
    return "\n".join(lines)


def _pdf(data: bytes, filename: str) -> str:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidFile(f"{filename} is an encrypted PDF")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except InvalidFile:
        raise
    except Exception as e:  # pypdf raises many kinds for a damaged file
        raise InvalidFile(f"{filename} is not a readable PDF: {e}") from None
