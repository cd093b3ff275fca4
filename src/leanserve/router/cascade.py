"""Smallest model first: a named route that tries its tiers in order and stops at the first
answer it trusts.

`--cascade fast=SmolLM2-135M-Instruct,big` serves `model: "fast"`. A tier is the local base
model, a local adapter, or an upstream OpenAI-compatible server (`--upstream
big=http://host:8001/v1`). Each tier but the last answers with logprobs; its answer is
accepted when the rule's statistic of the answer's token logprobs reaches the threshold
(`--cascade-rule fast=mean:-0.5`), else the request escalates. The last tier's answer is
always accepted. A tier that fails (down, timeout, malformed answer) is skipped; when every
tier fails, the best answer seen is returned (marked), or, with none, 502 / 504.

Statistics (`RULES`): `mean` (the length-normalised log likelihood), `min` (the least sure
token), `p10` (the 10th percentile: a few unsure tokens, not one, reject). An empty answer
scores 0 (sure).

Upstream options ride in the URL's fragment, which is never sent: `#model=NAME` (default: the
upstream's first listed model), `key_env=VAR` (default LEANSERVE_UPSTREAM_KEY_<NAME>) and
`timeout=SECONDS` (default --upstream-timeout-seconds).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiohttp

RULES = ("mean", "min", "p10")
DEFAULT_RULE = ("mean", -0.5)  # see BENCHMARKS.md (`leanserve bench cascade`) for the sweep behind it
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def confidence(logprobs: list[float], stat: str) -> float:
    if not logprobs:
        return 0.0
    if stat == "mean":
        return sum(logprobs) / len(logprobs)
    if stat == "min":
        return min(logprobs)
    if stat == "p10":
        ordered = sorted(logprobs)
        return ordered[min(len(ordered) - 1, int(0.1 * len(ordered)))]
    raise ValueError(f"unknown confidence statistic {stat!r} (one of {', '.join(RULES)})")


def parse_rule(text: str) -> tuple[str, float]:
    """`STAT:THRESHOLD`, e.g. `mean:-0.5`."""
    stat, _, value = text.partition(":")
    if stat not in RULES:
        raise ValueError(f"cascade rule {text!r}: the statistic must be one of {', '.join(RULES)}")
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"cascade rule {text!r}: the threshold must be a number (a log probability <= 0)") from None
    if not math.isfinite(threshold) or threshold > 0:
        raise ValueError(f"cascade rule {text!r}: the threshold must be a log probability <= 0")
    return stat, threshold


@dataclass
class Upstream:
    """An OpenAI-compatible server a cascade can escalate to."""

    name: str
    url: str  # the base URL, up to /v1
    model: str | None = None  # None: its first listed model, asked once
    key: str | None = None
    timeout: float = 60.0

    @classmethod
    def parse(cls, spec: str, timeout: float = 60.0) -> Upstream:
        """`NAME=URL[#model=M&key_env=VAR&timeout=SECONDS]`."""
        name, sep, url = spec.partition("=")
        if not sep or not NAME_RE.fullmatch(name) or not url.startswith(("http://", "https://")):
            raise ValueError(f"--upstream {spec!r}: expected NAME=http(s)://host:port/v1")
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.fragment))
        unknown = set(options) - {"model", "key_env", "timeout"}
        if unknown:
            raise ValueError(f"--upstream {spec!r}: unknown option(s) {', '.join(sorted(unknown))} "
                             "(model, key_env, timeout)")
        try:
            timeout = float(options.get("timeout", timeout))
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < math.inf:
            raise ValueError(f"--upstream {spec!r}: timeout must be a positive number of seconds")
        key_env = options.get("key_env", f"LEANSERVE_UPSTREAM_KEY_{re.sub(r'[^A-Z0-9]', '_', name.upper())}")
        base = urlunsplit(parts._replace(fragment="")).rstrip("/")
        return cls(name, base, options.get("model"), os.environ.get(key_env), timeout)


class UpstreamError(Exception):
    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class UpstreamClient:
    """One aiohttp session per upstream, opened at the first call (on the server's loop)."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        up = self.upstream
        if self._session is None:
            headers = {"Authorization": f"Bearer {up.key}"} if up.key else {}
            self._session = aiohttp.ClientSession(headers=headers)
        timeout = aiohttp.ClientTimeout(total=up.timeout, connect=min(5.0, up.timeout))
        try:
            async with self._session.request(method, up.url + path, json=body, timeout=timeout) as r:
                text = await r.text()
                status = r.status
        except asyncio.TimeoutError:
            raise UpstreamError(f"upstream `{up.name}` ({up.url}) did not answer within {up.timeout:g} s",
                                timeout=True) from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"upstream `{up.name}` ({up.url}) is unreachable: {e}") from None
        if status != 200:
            raise UpstreamError(f"upstream `{up.name}` answered {status}: {text[:300]}")
        try:
            data = json.loads(text)
        except ValueError:
            raise UpstreamError(f"upstream `{up.name}` answered malformed JSON: {text[:120]!r}") from None
        if not isinstance(data, dict):
            raise UpstreamError(f"upstream `{up.name}` answered JSON that is not an object")
        return data

    async def model(self) -> str:
        if self.upstream.model is None:
            listed = await self._request("GET", "/models")
            try:
                self.upstream.model = listed["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise UpstreamError(f"upstream `{self.upstream.name}` lists no models") from None
        return self.upstream.model

    async def chat(self, body: dict) -> dict:
        """A chat completion; malformed answers (no choices, no message) are UpstreamErrors."""
        data = await self._request("POST", "/chat/completions", dict(body, model=await self.model()))
        try:
            message = data["choices"][0]["message"]
            if not isinstance(message, dict):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise UpstreamError(f"upstream `{self.upstream.name}` answered without choices[0].message") from None
        return data


@dataclass
class Route:
    name: str
    tiers: list[str]
    rule: tuple[str, float] = DEFAULT_RULE

    @classmethod
    def parse(cls, spec: str) -> Route:
        """`NAME=TIER,TIER[,...]`."""
        name, sep, tiers = spec.partition("=")
        names = [t.strip() for t in tiers.split(",") if t.strip()]
        if not sep or not NAME_RE.fullmatch(name) or len(names) < 2:
            raise ValueError(f"--cascade {spec!r}: expected NAME=TIER,TIER[,...] with at least two tiers")
        return cls(name, names)


@dataclass
class TierResult:
    """One tier's try: its answer (or error), the confidence and whether it was accepted."""

    tier: str
    body: dict | None = None
    token_logprobs: list[float] = field(default_factory=list)
    confidence: float | None = None
    accepted: bool = False
    error: str | None = None
    timeout: bool = False

    def record(self) -> dict:
        usage = (self.body or {}).get("usage") or {}
        bill = usage.get("leanserve") or {}
        out = {"tier": self.tier, "accepted": self.accepted,
               "confidence": None if self.confidence is None else round(self.confidence, 4),
               "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
               "energy_joules": bill.get("energy_joules", 0.0)}
        if self.error:
            out["error"] = self.error
        return out


def token_logprobs(body: dict) -> list[float]:
    """The chosen tokens' logprobs of choices[0] of a chat completion body."""
    logprobs = (body.get("choices") or [{}])[0].get("logprobs") or {}
    return [float(t["logprob"]) for t in logprobs.get("content") or [] if isinstance(t, dict) and "logprob" in t]


def total_bill(results: list[TierResult]) -> dict:
    """Every tier's energy, carbon and cost, summed (an upstream without a bill adds 0)."""
    out = {"energy_joules": 0.0, "carbon_grams": 0.0, "cost_usd": 0.0}
    for r in results:
        bill = ((r.body or {}).get("usage") or {}).get("leanserve") or {}
        for k in out:
            value = bill.get(k, 0.0)
            out[k] += value if isinstance(value, (int, float)) else 0.0
    return {k: round(v, 9) for k, v in out.items()}
