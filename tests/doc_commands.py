"""Commands shown in the README, the docs and the recipes, checked against the package: the
module exists and its parser accepts the arguments shown."""

import argparse
import re
import shlex
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands_in(text: str) -> list[str]:
    """Every `python -m mixcl_ray...`/`data_prep` command line in a text, continuations joined."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    return re.findall(r"python -m (?:mixcl_ray|data_prep)[^\n`'\"|]*", text)


def code_blocks(markdown: str) -> str:
    """The text of a Markdown file's fenced code blocks, but for ```text blocks (a program's
    output, which may name a command without its arguments)."""
    blocks = re.findall(r"```([a-z]*)\n(.*?)```", markdown, re.S)
    return "\n".join(body for language, body in blocks if language != "text")


def _parser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    start = argv.index("-m")
    module, args = argv[start + 1], argv[start + 2 :]
    found = import_module(module)
    if not hasattr(found, "build_parser") and hasattr(found, "__path__"):
        found = import_module(f"{module}.cli")  # python -m data_prep runs data_prep.cli
    if not hasattr(found, "build_parser"):  # a module that takes no arguments
        return argparse.ArgumentParser(prog=module), args
    return found.build_parser(), args


def check_module_command(command: str) -> None:
    """A whole command line: its parser accepts the arguments (SystemExit, a failed test, on an
    unknown flag or a missing required one), and any --space names a shipped space file."""
    parser, args = _parser(shlex.split(command.split("#")[0]))
    parsed = parser.parse_args(args)
    if getattr(parsed, "space", None):
        from mixcl_ray.spaces import space_path

        assert space_path(parsed.space).exists(), parsed.space


def check_mentioned_command(command: str) -> None:
    """A command named in prose: the module exists and every --flag shown is one it has."""
    parser, args = _parser(shlex.split(command.split("#")[0]))
    known = set()
    for action in parser._actions:
        known.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known.update(o for a in sub._actions for o in a.option_strings)
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"{command}: unknown flags {unknown}"
