"""Whether the argument parser refuses a value: how typed arguments (``constraints.py``, ``Literal``) are checked,
since the annotations check nothing when a class is called from Python."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser


def parser_refuses(cls: type, **kwargs: Any) -> bool:
    """True if jsonargparse, reading ``cls``'s signature as LightningCLI does, refuses ``--x.key=value`` and its
    message names the key (a class with other required arguments is refused for those too, which does not count)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "x", fail_untyped=False)
    try:
        parser.parse_args([f"--x.{key}={value}" for key, value in kwargs.items()])
    except Exception as error:  # argparse.ArgumentError, with the field and the constraint in its message
        return any(f'"{key}"' in str(error) or f"x.{key}" in str(error) for key in kwargs)
    return False
