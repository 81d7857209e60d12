"""How ``train.py`` ends when something is wrong: one line on stderr naming the field, and an exit status a script can read.

* A value the argument parser refuses (an unknown key or class, a wrong type, a value outside its constrained
  type, ``constraints.py``): jsonargparse prints its usage (some hundred lines) and a nested report of every type
  it tried; ``OneLineParser`` prints the innermost reason instead, with the full key
  (``train.py: error: model.init_args.r: Input should be greater than 0 (got 0)``). Exit status 2.
* An error of configuration or input raised while building or running (``USER_ERRORS``: a technique's
  one-sentence check, a bad value that Lightning or torch refuse): its first specific line. Exit status 2.
* Ctrl-C: exit status 130 (128 + SIGINT), as a shell reports an interrupted command, so that a script can tell
  an interrupted run from a finished one. Lightning ends an interrupted ``fit`` with ``sys.exit(1)``.

``MORPHLAB_TRACEBACK=1`` shows the traceback, or the parser's whole report, instead.
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, MisconfigurationException)
INTERRUPTED = 130

# jsonargparse's report of a failed union: lines about the types it tried, not about the value
GENERIC = re.compile(r"^(Does not validate against|Subtypes:|Errors:|Expected a <class 'NoneType'>|Given value|"
                     r"Not a valid subclass|Subclass types expect|a class path|a dict |Problem with given class_path|"
                     r"Import path |\d+ validation errors? for|For further information|Type \S+ expects a function)")
KEY = re.compile(r'^(\s*)(?:- )?Parser key "([^"]+)":\s*(.*)$')


def _lines(message: str) -> list[str]:
    """The report's lines, a 'Parser key' that follows other text on a line moved to a line of its own."""
    out = []
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip())
        head, sep, tail = line.partition('Parser key "')
        if sep and head.strip() and head.strip() != "-":
            out += [head.rstrip(), " " * (indent + 2) + sep + tail]
        else:
            out.append(line)
    return out


def _bound(message: str, reason: str) -> str:
    """The bound the reason speaks of, from the innermost constrained type in the report (``Gt(gt=0)`` -> ``0``)."""
    names = "gt|ge" if "greater" in reason else "lt|le"
    found = re.findall(rf"(?:{names})=(-?[\d.e+-]+)", message)
    return found[-1] if found else ""


def parser_error_line(message: str) -> str:
    """The innermost reason of a jsonargparse error report, prefixed with the full key it concerns."""
    keys: list[tuple[int, str]] = []  # (indent, key) of the enclosing "Parser key" lines
    path, reason = "", ""
    for line in _lines(message):
        match = KEY.match(line)
        if match:
            indent = len(match.group(1))
            keys = [(i, k) for i, k in keys if i < indent] + [(indent, match.group(2))]
            path = ".init_args.".join(k for _, k in keys)
            reason = match.group(3).strip()
            continue
        text = line.strip().removeprefix("- ").strip()
        if path and text and not GENERIC.match(text) and (not reason or GENERIC.match(reason)):
            reason = text
    if not path:  # not about a key: an unknown option, a missing file, a bad subcommand
        return next((line.strip() for line in message.splitlines() if line.strip()), message)
    reason = re.sub(r"\s*\[type=[^\]]*input_value=('?)(.*?)\1, input_type=\w+\]", r" (got \2)", reason)
    reason = re.sub(r"\s*For further information.*$", "", reason)
    reason = re.sub(r"(\. Got value: .*?)\. Got value: .*$", r"\1", reason)  # the outer union's repeat
    if re.search(r"(than|to)( \(got |$)", reason) and (bound := _bound(message, reason)):
        reason = re.sub(r"(than|to)(?= \(got |$)", rf"\1 {bound}", reason, count=1)  # pydantic's message lost it
    reason = re.sub(r"^Type .* expects a function or a callable class: ", "", reason)
    reason = re.sub(r"\. Got value: Namespace\(.*$", "", reason)
    return f"{path}: {reason or 'invalid value'}"


class OneLineParser(LightningArgumentParser):
    """LightningCLI's parser, but a refused argument ends with one line and exit status 2 (module docstring)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("MORPHLAB_TRACEBACK"):
            super().error(message, ex)  # raises, or prints jsonargparse's whole report
        print(f"train.py: error: {parser_error_line(message)}", file=sys.stderr)
        raise SystemExit(2)


def one_line(error: BaseException) -> str:
    """The line of an error raised while building or running that says what is wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line[2:] for line in lines[1:] if line.startswith("- ") and not GENERIC.match(line[2:])]
    return specific[0] if specific else (lines[0] if lines else type(error).__name__)
