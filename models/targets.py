"""Which layers of a network a technique acts on: ``target_modules`` / ``exclude_modules`` with peft's semantics.

* a list of strings: a module matches when its qualified name equals an entry or ends with ``"." + entry``
  (``["fc1", "fc2"]`` matches ``blocks.3.mlp.fc1``);
* one string: a regular expression the whole qualified name must match (``r"layer\\d\\.\\d\\.conv\\d"``);
* ``"all-linear"`` / ``"all"``: every layer of the technique's types except the output layer (the last one in
  module order), as peft's ``all-linear``.

``exclude_modules`` removes names by the same rules. Only modules of the technique's layer types are candidates.
"""

import re
from collections.abc import Sequence

from torch import nn

TargetModules = Sequence[str] | str
"""A list of name suffixes, or one regex matched against the whole qualified module name."""


def name_matches(name: str, pattern: TargetModules | None) -> bool:
    """Whether ``name`` is selected by ``pattern`` (suffix list or full regex, as described above; None: no)."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def network_name(model: nn.Module) -> str:
    """``TimmNet(vit_tiny_patch16_224)`` for a network by name, else the class name."""
    name = getattr(model, "name", None)
    return f"{type(model).__name__}({name})" if isinstance(name, str) else type(model).__name__


def output_layer(model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)) -> str:
    """Qualified name of the last layer of ``types`` in module order (the classifier of every network here)."""
    names = [name for name, module in model.named_modules() if isinstance(module, types)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no {' / '.join(t.__name__ for t in types)} layer.")
    return names[-1]


def match_modules(
    model: nn.Module,
    target_modules: TargetModules,
    exclude_modules: TargetModules | None,
    types: tuple[type[nn.Module], ...],
    technique: str,
) -> dict[str, nn.Module]:
    """The modules of ``types`` that ``target_modules`` selects and ``exclude_modules`` does not, by name.

    Raises one sentence naming the network, the technique and the fix when nothing is selected.
    """
    candidates = {name: m for name, m in model.named_modules() if name and isinstance(m, types)}
    if target_modules in ("all-linear", "all"):
        last = output_layer(model, types) if candidates else None
        chosen = {n: m for n, m in candidates.items() if n != last}
    else:
        chosen = {n: m for n, m in candidates.items() if name_matches(n, target_modules)}
    chosen = {n: m for n, m in chosen.items() if not name_matches(n, exclude_modules)}
    if not chosen:
        kinds = " / ".join(t.__name__ for t in types)
        examples = ", ".join(list(candidates)[:4]) or "none"
        raise ValueError(
            f"{technique}: target_modules {target_modules!r} (exclude_modules {exclude_modules!r}) selects no "
            f"{kinds} layer of {network_name(model)}; its {kinds} layers are named like: {examples}."
        )
    return chosen
