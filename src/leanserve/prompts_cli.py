"""`leanserve prompts`: the prompt versions of a directory (the one `serve --prompts DIR` serves).

    leanserve prompts list DIR
    leanserve prompts show DIR ID [--version V]
    leanserve prompts render DIR ID [--version V] [--var NAME=VALUE ...] [--vars-json JSON]

`--version` takes a version, a label or `latest` (the default). A `--var` value is taken as
text for a string input and as JSON for the others (`--var n=3`, `--var tags='["a"]'`).
Files that cannot be loaded and conflicting versions are reported on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

from .cli import HelpFormatter
from .errors import LeanserveError
from .router.templates import PromptLibrary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve prompts", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    help="list, show or render; `leanserve prompts ACTION --help` shows its flags")
    ls = actions.add_parser("list", help="every prompt version, its labels and description",
                            formatter_class=HelpFormatter)
    ls.add_argument("dir", metavar="DIR", help="the prompt directory (*.prompty files)")
    for name, help in (("show", "one prompt version's file"), ("render", "one prompt version's messages, rendered")):
        action = actions.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        action.add_argument("dir", metavar="DIR", help="the prompt directory (*.prompty files)")
        action.add_argument("id", metavar="ID", help="the prompt's id")
        action.add_argument("--version", default=None, metavar="V", help="a version, a label or latest")
        if name == "render":
            action.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                                help="one variable (repeatable); JSON unless the input is a string")
            action.add_argument("--vars-json", default=None, metavar="JSON", help="all variables as one JSON object")
    return parser


def _variables(prompt, args) -> dict:
    variables = {}
    if args.vars_json:
        try:
            variables = json.loads(args.vars_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"--vars-json is not JSON: {e}") from None
        if not isinstance(variables, dict):
            raise ValueError("--vars-json must be a JSON object")
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--var {item!r}: expected NAME=VALUE")
        spec = prompt.inputs.get(name)
        if spec is None or spec.type == "string":
            variables[name] = value  # an unknown name is reported by the check that follows
            continue
        try:
            variables[name] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--var {name}: a {spec.type} input takes a JSON value, not {value!r}") from None
    return variables


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        library = PromptLibrary(args.dir)
        for path, why in library.report.errors.items():
            print(f"leanserve prompts: skipped {path}: {why}", file=sys.stderr)
        for conflict in library.report.conflicts:
            print(f"leanserve prompts: {conflict}", file=sys.stderr)
        if args.action == "list":
            print(f"{'id':<24} {'version':>8}  {'labels':<20} description")
            for prompt in library.list():
                labels = ",".join(library.labels_of(prompt)) or "-"
                print(f"{prompt.id:<24} {prompt.version:>8}  {labels:<20} {prompt.description}")
            return 0
        prompt = library.get(args.id, args.version)
        if args.action == "show":
            print(f"# {prompt.path} (labels: {', '.join(library.labels_of(prompt)) or 'none'})")
            print(prompt.source, end="" if prompt.source.endswith("\n") else "\n")
            return 0
        rendered = library.render(prompt.id, prompt.version, _variables(prompt, args))
        print(json.dumps({"prompt_id": rendered.prompt_id, "version": rendered.version,
                          "messages": rendered.messages, "settings": rendered.settings}, indent=2))
        return 0
    except (LeanserveError, ValueError) as e:
        print(f"leanserve prompts: {e}", file=sys.stderr)
        return 1
