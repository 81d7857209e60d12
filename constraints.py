"""Constrained argument types: the parser refuses a bad value before anything is built, naming the field.

``Annotated[int, Gt(0)]`` and friends (the ``annotated_types`` vocabulary), which jsonargparse validates through
pydantic. Not ``jsonargparse.typing.PositiveInt``: that one hands the constructor a ``PositiveInt`` instance, which
then lands in checkpoints (a scheduler's ``T_max``, a callback's state) and makes ``torch.load(weights_only=True)``
refuse them; these give plain ``int``/``float`` values. Called from Python, the annotations check nothing: the
constructors keep the checks that relate two fields.

A module whose signatures use them must not say ``from __future__ import annotations``: jsonargparse resolves
string annotations with ``typing.get_type_hints`` without ``include_extras``, which drops the constraint
(tests/test_bad_inputs.py guards this).
"""

from typing import Annotated

from annotated_types import Ge, Gt, Interval

PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Probability = Annotated[float, Interval(ge=0, le=1)]  # [0, 1]
Fraction = Annotated[float, Interval(ge=0, lt=1)]  # [0, 1): a sparsity, a dropout rate
OpenFraction = Annotated[float, Interval(gt=0, lt=1)]  # (0, 1): a threshold, a decay
UnitFraction = Annotated[float, Interval(gt=0, le=1)]  # (0, 1]: a share of the run
Degrees = Annotated[float, Interval(ge=0, le=180)]  # [0, 180]: a rotation's largest angle
