"""`leanserve bench structured` on a few schemas and tiny outputs (its report's fields), and
`bench serve --response-format/--schema` parsing, request bodies and histogram estimates."""
from __future__ import annotations

import json

import pytest

from leanserve.bench import loadgen, structured


def test_bench_structured_report(tmp_path):
    schemas = tmp_path / "schemas.jsonl"
    rows = [{"name": "person", "schema": {"type": "object", "properties": {"name": {"type": "string"},
                                                                          "age": {"type": "integer"}},
                                          "required": ["name", "age"], "additionalProperties": False}},
            {"name": "flag", "schema": {"type": "object", "properties": {"on": {"type": "boolean"}},
                                        "required": ["on"], "additionalProperties": False}},
            {"name": "color", "schema": {"type": "object", "properties": {
                "c": {"type": "string", "enum": ["red", "green", "blue"]}}, "required": ["c"]}}]
    schemas.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    result = structured.main(["--schemas", str(schemas), "--concurrency", "3", "--max-tokens", "4",
                              "--repeats", "1", "--gen-schemas", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["compile_ms"]["schemas"] == result["compile_ms"]["compiled"] == 3
    assert 0 < result["compile_ms"]["p50"] <= result["compile_ms"]["p99"]
    assert result["mask_us"]["masks"] > 0 and 0 < result["mask_us"]["p50"] <= result["mask_us"]["p99"]
    assert 0 <= result["forced_token_share"] <= 1
    assert set(result["output_tokens_per_s"]) == {"unconstrained", "constrained"}
    assert all(v["median"] > 0 for v in result["output_tokens_per_s"].values())
    assert result["tokens_per_request"]["unconstrained"] == 4 and result["tokens_per_request"]["constrained"] <= 4
    assert result["ratio_constrained_over_unconstrained"] > 0
    assert result["gen_schemas"] == ["person", "flag", "color"] and result["compile_errors"] == {}


def test_bundled_schemas_are_distinct_and_many():
    rows = structured.load_schemas(structured.SCHEMAS)
    assert len(rows) >= 50
    assert len({json.dumps(r["schema"], sort_keys=True) for r in rows}) == len(rows)


def test_serve_response_format_arguments(tmp_path):
    schema = tmp_path / "order.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"id": {"type": "integer"}}}))
    args = loadgen.parse_args(["--schema", str(schema)])
    assert args.response_format == "json_schema"
    body = loadgen.request_body(args, "m", "hi", loadgen.response_format(args))
    assert "ignore_eos" not in body and "min_tokens" not in body
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "order", "schema": {"type": "object", "properties": {"id": {"type": "integer"}}}, "strict": True}}
    assert loadgen.request_body(args, "m", "hi")["ignore_eos"] is True  # the unconstrained side
    args = loadgen.parse_args(["--response-format", "json_object", "--concurrency", "1,32"])
    assert loadgen.response_format(args) == {"type": "json_object"} and args.concurrency == [1, 32]
    assert loadgen.parse_args([]).response_format is None
    for bad in (["--response-format", "json_schema"], ["--response-format", "json_object", "--schema", str(schema)],
                ["--response-format", "yaml"]):
        with pytest.raises(SystemExit):
            loadgen.parse_args(bad)


def test_histogram_quantile_from_bucket_growth():
    inf = float("inf")
    before = {1e-5: 10, 2e-5: 10, 5e-5: 10, inf: 10}
    after = {1e-5: 10, 2e-5: 60, 5e-5: 110, inf: 110}  # 50 in (10, 20] us, 50 in (20, 50] us
    assert loadgen.histogram_quantile(0.5, before, after) == pytest.approx(2e-5)
    assert loadgen.histogram_quantile(0.25, before, after) == pytest.approx(1.5e-5)
    assert loadgen.histogram_quantile(0.99, before, after) == pytest.approx(2e-5 + 3e-5 * 0.98)
    assert loadgen.histogram_quantile(0.5, after, after) is None
    assert loadgen.histogram_quantile(0.99, {}, {1e-5: 1, inf: 10}) == 1e-5  # in +Inf: the top bound


def test_constrained_ratios():
    def level(fmt, tok_s, tpot):
        return {"concurrency": 1, "request_rate": None, "response_format": fmt, "structured": None,
                "summary": {"output_tokens_per_s": tok_s, "tpot_ms": {"p50": tpot}, "output_tokens_mean": 10}}
    [r] = loadgen.constrained_ratios([level(None, 100.0, 10.0), level("json_object", 95.0, 10.5)])
    assert (r["output_tok_s"], r["tpot_p50"], r["response_format"]) == (0.95, 1.05, "json_object")
