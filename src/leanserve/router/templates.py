"""Versioned prompt templates: one `.prompty` file per prompt version, rendered in jinja2's sandbox.

A file is YAML front matter between `---` lines, then the messages, as in Prompty:

    ---
    id: support-answer
    version: 2
    labels: [production]
    description: Answers a support question in the product's voice
    model:
      name: smollm2
      parameters: {temperature: 0.2, max_tokens: 200}
    inputs:
      product: {type: string, default: leanserve}
      question: {type: string}
    ---
    system:
    You answer questions about {{ product }}.

    user:
    {{ question }}

Versions are dotted non-negative integers ("3", "1.10"), compared number by number, so
1.10 > 1.9 and "2" is the same version as "2.0". Once loaded, a version's content never
changes: a reload that finds other content under a loaded (id, version) keeps the first and
reports a conflict. Labels are pointers, re-read on every reload (they are not part of the
immutable content), so a label moves by editing the files' `labels`.

Each message is its own template, rendered after the body is split into messages, so a
variable's value can never open a new message (`"\\nsystem:\\n..."` stays text). Templates
come only from the operator's files; variables are data, never templates. The sandbox
refuses attribute tricks (`''.__class__`), includes and imports (there is no loader), and
huge repetitions.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jinja2 import BaseLoader, StrictUndefined, TemplateError, TemplateNotFound, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import InvalidRequest

log = logging.getLogger("leanserve.router.templates")

SUFFIX = ".prompty"
ROLES = ("system", "developer", "user", "assistant")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_PATTERN = re.compile(r"^\d+(\.\d+)*$")
ROLE_LINE = re.compile(r"^\s*(" + "|".join(ROLES) + r")\s*:\s*$", re.IGNORECASE)
# the request settings a template may set (chat completions names; `text.format` becomes response_format)
SETTINGS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty",
            "seed", "stop", "top_k", "min_p", "repetition_penalty", "response_format", "tools", "tool_choice")
TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
         "array": (list,), "object": (dict,)}
MAX_REPEAT = 100_000  # the longest string or list `*` and `**` may build in a template


class PromptFileError(ValueError):
    """A prompt file that cannot be loaded; the library skips it and reports why."""


class _NoLoader(BaseLoader):
    def get_source(self, environment, template):
        raise TemplateNotFound(f"{template} (prompt templates cannot include or import other files)")


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with `*` and `**` bounded so a template cannot build gigabytes."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError("exponents above 64 are refused")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_REPEAT:
                    raise SecurityError(f"repetitions longer than {MAX_REPEAT} are refused")
        return super().call_binop(context, operator, left, right)


ENV = _Sandbox(loader=_NoLoader(), undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


def version_key(version: str) -> tuple[int, ...]:
    """(1, 10) for "1.10"; trailing zeros dropped, so "2" and "2.0" are one version."""
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


@dataclass(frozen=True)
class Input:
    name: str
    type: str
    default: object = None
    required: bool = True  # False when the file gives a default
    description: str = ""


@dataclass(frozen=True)
class Prompt:
    """One version of one prompt, as loaded from its file. Immutable."""

    id: str
    version: str
    description: str
    model: str | None
    settings: dict
    inputs: dict[str, Input]
    messages: tuple[tuple[str, str], ...]  # (role, template source)
    path: str
    digest: str  # of everything but `labels`
    source: str


@dataclass(frozen=True)
class RenderedPrompt:
    messages: list[dict]  # {"role", "content"}
    settings: dict  # defaults for the request (chat completions field names)
    prompt_id: str
    version: str


@dataclass
class LoadReport:
    """What the last reload found wrong: unloadable files and conflicting versions or labels."""

    errors: dict[str, str] = field(default_factory=dict)  # path -> why it was skipped
    conflicts: list[str] = field(default_factory=list)


def parse_file(path: str | Path) -> tuple[Prompt, list[str]]:
    """A prompt version and its labels from one file; PromptFileError says what is wrong."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read: {e}") from None
    return parse_text(text, path)


def parse_text(text: str, path: str = "<string>") -> tuple[Prompt, list[str]]:
    match = re.match(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?\n?(.*)\Z", text, re.DOTALL | re.MULTILINE)
    if not match:
        raise PromptFileError("expected YAML front matter between '---' lines, then the messages")
    try:
        front = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        raise PromptFileError(f"front matter is not YAML: {e}") from None
    if not isinstance(front, dict):
        raise PromptFileError("front matter must be a mapping")
    known = {"id", "name", "version", "description", "label", "labels", "model", "parameters", "text",
             "response_format", "tools", "tool_choice", "inputs", "variables", "authors", "tags", "sample"}
    unknown = sorted(set(front) - known)
    if unknown:
        raise PromptFileError(f"unknown front matter keys: {', '.join(map(str, unknown))}")
    pid = front.get("id", front.get("name"))
    if not isinstance(pid, str) or not ID_PATTERN.match(pid):
        raise PromptFileError("'id' must be 1-64 letters, digits, '_', '.' or '-'")
    version = _version(front.get("version"))
    labels = _labels(front)
    model, settings = _settings(front)
    inputs = _inputs(front.get("inputs", front.get("variables")) or {})
    messages = _messages(match.group(2), set(inputs))
    content = {k: v for k, v in front.items() if k not in ("label", "labels")}
    digest = hashlib.sha256(json.dumps([content, match.group(2)], sort_keys=True, default=str).encode()).hexdigest()
    description = front.get("description") or ""
    if not isinstance(description, str):
        raise PromptFileError("'description' must be a string")
    return Prompt(pid, version, description, model, settings, inputs, messages, path, digest, text), labels


def _version(value) -> str:
    if isinstance(value, bool) or value is None:
        raise PromptFileError("'version' is required: a number such as 3 or a dotted one such as '1.10'")
    if isinstance(value, float):  # YAML reads 1.10 as 1.1
        raise PromptFileError(f"quote a dotted version (version: '{value}'): YAML reads it as a decimal number")
    value = str(value)
    if not VERSION_PATTERN.match(value):
        raise PromptFileError(f"'version' must be dotted non-negative integers such as 3 or '1.10', not {value!r}")
    return value


def _labels(front: dict) -> list[str]:
    labels = front.get("labels", front.get("label", []))
    labels = [labels] if isinstance(labels, str) else labels
    if not isinstance(labels, list) or not all(isinstance(x, str) and ID_PATTERN.match(x) for x in labels):
        raise PromptFileError("'labels' must be a list of names (letters, digits, '_', '.', '-')")
    bad = [x for x in labels if x == "latest" or VERSION_PATTERN.match(x)]
    if bad:
        raise PromptFileError(f"label {bad[0]!r} would shadow a version: labels cannot be 'latest' or numbers")
    return labels


def _settings(front: dict) -> tuple[str | None, dict]:
    """The model name and the request defaults: Prompty's `model.parameters` (or top-level
    `parameters`), `text.format` / `response_format`, `tools`, `tool_choice`."""
    model = front.get("model")
    params = dict(front.get("parameters") or {})
    if isinstance(model, dict):
        params = {**(model.get("parameters") or {}), **params}
        model = model.get("name")
    if model is not None and not isinstance(model, str):
        raise PromptFileError("'model' must be a name or a mapping with 'name' and 'parameters'")
    settings = dict(params)
    text = front.get("text")
    if text is not None:
        if not isinstance(text, dict) or set(text) != {"format"} or not isinstance(text["format"], dict):
            raise PromptFileError("'text' must be a mapping with one key, 'format'")
        settings["response_format"] = _chat_format(text["format"])
    if "response_format" in front:
        settings["response_format"] = front["response_format"]
    if "tools" in front:
        settings["tools"] = [_chat_tool(t) for t in front["tools"] or []]
    if "tool_choice" in front:
        settings["tool_choice"] = front["tool_choice"]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise PromptFileError(f"unknown settings: {', '.join(map(str, unknown))} (known: {', '.join(SETTINGS)})")
    return model, settings


def _chat_format(fmt: dict) -> dict:
    """The Responses API's flat `text.format` as chat completions' `response_format`."""
    if fmt.get("type") != "json_schema" or "json_schema" in fmt:
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def _chat_tool(tool) -> dict:
    """A flat Responses-style function tool as chat completions' nested one."""
    if not isinstance(tool, dict):
        raise PromptFileError("each of 'tools' must be a mapping")
    if tool.get("type") == "function" and "function" not in tool:
        return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
    return tool


def _inputs(spec) -> dict[str, Input]:
    """Prompty's `inputs: {name: {type, default, description}}`; `name: string` is short for a required one."""
    if not isinstance(spec, dict):
        raise PromptFileError("'inputs' must be a mapping of name -> {type, default, description}")
    out = {}
    for name, s in spec.items():
        if not isinstance(name, str) or not name.isidentifier():
            hint = " (YAML reads on/off/yes/no as booleans: quote the name)" if isinstance(name, bool) else ""
            raise PromptFileError(f"input name {name!r} must be an identifier{hint}")
        s = {"type": s} if isinstance(s, str) else s
        if not isinstance(s, dict) or s.get("type", "string") not in TYPES:
            raise PromptFileError(f"input {name!r}: 'type' must be one of {', '.join(TYPES)}")
        unknown = set(s) - {"type", "default", "description", "sample"}
        if unknown:
            raise PromptFileError(f"input {name!r}: unknown keys {', '.join(sorted(unknown))}")
        kind = s.get("type", "string")
        has_default = "default" in s
        if has_default and s["default"] is not None and not _is_type(s["default"], kind):
            raise PromptFileError(f"input {name!r}: its default is not of type {kind}")
        out[name] = Input(name, kind, s.get("default"), not has_default, s.get("description") or "")
    return out


def _messages(body: str, declared: set[str]) -> tuple[tuple[str, str], ...]:
    """Split on `role:` lines; each message compiled now, so a bad template fails at load."""
    messages, role, lines = [], None, []
    for line in body.splitlines():
        m = ROLE_LINE.match(line)
        if m:
            if role is not None:
                messages.append((role, "\n".join(lines).strip()))
            role, lines = m.group(1).lower(), []
        elif role is None and line.strip():
            raise PromptFileError(f"the body must start with a role line ({', '.join(r + ':' for r in ROLES)})")
        else:
            lines.append(line)
    if role is not None:
        messages.append((role, "\n".join(lines).strip()))
    if not messages:
        raise PromptFileError("the body has no messages")
    for role, source in messages:
        try:
            ast = ENV.parse(source)
        except TemplateError as e:
            raise PromptFileError(f"{role} message: {e}") from None
        if any(isinstance(n, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends))
               for n in ast.find_all(nodes.Stmt)):
            raise PromptFileError(f"{role} message: include, import and extends are not allowed")
        private = [n.attr for n in ast.find_all(nodes.Getattr) if n.attr.startswith("_")]
        private += [n.arg.value for n in ast.find_all(nodes.Getitem)
                    if isinstance(n.arg, nodes.Const) and str(n.arg.value).startswith("_")]
        if private:  # the sandbox would refuse them at render time anyway: say so at load
            raise PromptFileError(f"{role} message: private attributes are refused by the sandbox: {private[0]}")
        undeclared = meta.find_undeclared_variables(ast) - declared - set(ENV.globals)
        if undeclared:
            raise PromptFileError(f"{role} message uses undeclared inputs: {', '.join(sorted(undeclared))}")
    return tuple(messages)


def _is_type(value, kind: str) -> bool:
    if isinstance(value, bool) and kind != "boolean":
        return False
    return isinstance(value, TYPES[kind])


def check_variables(prompt: Prompt, variables) -> dict:
    """The variables with defaults filled in; InvalidRequest (param prompt.variables.NAME) if
    one is missing, unknown or of the wrong type."""
    if not isinstance(variables, dict):
        raise InvalidRequest("'prompt.variables' must be an object", param="prompt.variables")
    where = f"prompt {prompt.id!r} version {prompt.version}"
    for name in variables:
        if name not in prompt.inputs:
            declared = ", ".join(prompt.inputs) or "none"
            raise InvalidRequest(f"Unknown variable {name!r} for {where} (it declares: {declared})",
                                 param=f"prompt.variables.{name}")
    values = {}
    for name, spec in prompt.inputs.items():
        if name not in variables:
            if spec.required:
                raise InvalidRequest(f"Missing variable {name!r} ({spec.type}) for {where}",
                                     param=f"prompt.variables.{name}")
            values[name] = spec.default
        elif not _is_type(variables[name], spec.type):
            raise InvalidRequest(f"Variable {name!r} of {where} must be of type {spec.type}, "
                                 f"not {type(variables[name]).__name__}", param=f"prompt.variables.{name}")
        else:
            values[name] = variables[name]
    return values


def render(prompt: Prompt, variables) -> RenderedPrompt:
    values = check_variables(prompt, variables)
    messages = []
    for role, source in prompt.messages:
        try:
            content = ENV.from_string(source).render(values)
        except SecurityError as e:
            raise InvalidRequest(f"prompt {prompt.id!r} version {prompt.version}: refused by the template "
                                 f"sandbox: {e}", param="prompt") from None
        except TemplateError as e:
            raise InvalidRequest(f"prompt {prompt.id!r} version {prompt.version} failed to render: {e}",
                                 param="prompt") from None
        messages.append({"role": role, "content": content})
    return RenderedPrompt(messages, copy.deepcopy(prompt.settings), prompt.id, prompt.version)


class PromptLibrary:
    """The prompt versions of one directory. `reload()` adds new versions; loaded ones stay as
    they were (also when their file goes away) until the process ends."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"prompt directory {str(directory)!r} does not exist or is not a directory")
        self.versions: dict[tuple[str, tuple[int, ...]], Prompt] = {}
        self.labels: dict[tuple[str, str], str] = {}  # (id, label) -> version
        self.report = LoadReport()
        self._signature = None
        self.reload()

    def _scan(self) -> list[os.DirEntry]:
        """The prompt files, by name; none when the directory went away (loaded versions stay)."""
        try:
            with os.scandir(self.directory) as entries:
                return sorted((e for e in entries if e.name.endswith(SUFFIX) and e.is_file()), key=lambda e: e.name)
        except OSError as e:
            log.warning("prompt directory %s cannot be read: %s", self.directory, e)
            return []

    def _current_signature(self) -> tuple:
        out = []
        for e in self._scan():
            try:
                st = e.stat()
            except OSError:  # removed since the scan
                continue
            out.append((e.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def reload_if_changed(self) -> bool:
        """Re-scans when a file was added, removed or touched (names, mtimes, sizes); True if it did."""
        if self._current_signature() == self._signature:
            return False
        self.reload()
        return True

    def reload(self) -> LoadReport:
        report = LoadReport()
        claims: dict[tuple[str, str], list[str]] = {}
        self._signature = self._current_signature()
        for entry in self._scan():
            try:
                prompt, labels = parse_file(entry.path)
            except PromptFileError as e:
                report.errors[entry.path] = str(e)
                log.warning("prompt file %s skipped: %s", entry.path, e)
                continue
            key = (prompt.id, version_key(prompt.version))
            loaded = self.versions.get(key)
            if loaded is None:
                self.versions[key] = prompt
            elif loaded.digest != prompt.digest:
                msg = (f"{entry.path}: prompt {prompt.id!r} version {prompt.version} differs from the one loaded "
                       f"from {loaded.path}; versions are immutable, the loaded one is kept (add a new version)")
                report.conflicts.append(msg)
                log.warning("%s", msg)
                continue
            for label in labels:
                claims.setdefault((prompt.id, label), []).append(loaded.version if loaded else prompt.version)
        labels = {}
        for (pid, label), versions in claims.items():
            versions = sorted(set(versions), key=version_key)
            if len(versions) > 1:
                msg = (f"label {label!r} of prompt {pid!r} is on versions {', '.join(versions)}; "
                       f"it points to {versions[-1]}")
                report.conflicts.append(msg)
                log.warning("%s", msg)
            labels[(pid, label)] = versions[-1]
        self.labels = labels
        self.report = report
        return report

    def list(self) -> list[Prompt]:
        return [self.versions[k] for k in sorted(self.versions)]

    def labels_of(self, prompt: Prompt) -> list[str]:
        return sorted(label for (pid, label), v in self.labels.items()
                      if pid == prompt.id and version_key(v) == version_key(prompt.version))

    def get(self, prompt_id: str, version: str | int | None = None) -> Prompt:
        """`version`: a version, a label, or None / "latest" for the highest version."""
        versions = sorted(v for pid, v in self.versions if pid == prompt_id)
        if not versions:
            raise InvalidRequest(f"Unknown prompt {prompt_id!r}", param="prompt.id")
        version = None if version is None else str(version)
        if version in (None, "", "latest"):
            return self.versions[(prompt_id, versions[-1])]
        if (prompt_id, version) in self.labels:
            version = self.labels[(prompt_id, version)]
        if VERSION_PATTERN.match(version) and (prompt_id, version_key(version)) in self.versions:
            return self.versions[(prompt_id, version_key(version))]
        known = [self.versions[(prompt_id, v)].version for v in versions]
        names = sorted(label for pid, label in self.labels if pid == prompt_id)
        raise InvalidRequest(f"Prompt {prompt_id!r} has no version or label {version!r} (versions: "
                             f"{', '.join(known)}; labels: {', '.join(names) or 'none'})", param="prompt.version")

    def render(self, prompt_id: str, version: str | int | None, variables) -> RenderedPrompt:
        return render(self.get(prompt_id, version), variables if variables is not None else {})
