"""The typed interface between text data and text networks (BERT encoders), which the base module drives.

A network may take a dict of token tensors instead of one tensor (``DictInputNetwork``), and may keep a frozen
prefix whose outputs it precomputes once per sample (``PrefixCachingNetwork``: a BERT's frozen bottom layers are
most of its cost). A datamodule that tokenizes names its tokenizer's encoder and hands every input over once
(``TokenizedData``). Structural (``typing.Protocol``): the classes implement them without importing this file,
so data never imports models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class DictInputNetwork(Protocol):
    """A network whose input is a dict of tensors; ``example_input()`` is one such input of batch 1."""

    def example_input(self) -> Mapping[str, Tensor] | Tensor: ...


@runtime_checkable
class PrefixCachingNetwork(Protocol):
    """A network with a frozen prefix: ``prepare_cache`` runs it once over every input before fit and test."""

    encoder_name: str

    def prepare_cache(self, batches: Sequence[Mapping[str, Tensor]]) -> None: ...


@runtime_checkable
class TokenizedData(Protocol):
    """A datamodule that tokenizes for ``encoder_name`` and gives ``all_inputs()``: every input once, in batches."""

    encoder_name: str

    def all_inputs(self) -> list[dict[str, Tensor]]: ...
