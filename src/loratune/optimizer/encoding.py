"""Our search space as Ax's parameters, and a point in the user's values to Ax's and back.

Most parameters go to Ax as written. Ax only takes linear parameter constraints: a product of positive
parameters, such as Module 4.5's ``lora_rank * batch_size <= 128``, is linear in log2 space, so the
parameters it names are given to Ax as their base-2 exponents (``log2(lora_rank) + log2(batch_size) <= 7``)
and decoded on the way back, and Ax never proposes a point that breaks the constraint. Under the LoRA
parameterization the learning rate goes to Ax as LoRA's effective step (``search_space.lora_parameterization``).
Which parameters are encoded so is the search space's to say (``Param.log2_encoded``, ``Param.step_scale``);
how is said here.
"""

from __future__ import annotations

import math
from typing import Any

from ..search_space import Param, SearchSpace, Value


def ax_name(p: Param) -> str:
    """The name of ``p``'s parameter in Ax."""
    if p.step_scale is not None:
        return f"log2_effective_{p.name}"
    return f"log2_{p.name}" if p.log2_encoded else p.name


def step_bounds(space: SearchSpace) -> tuple[float, float]:
    """Bounds of the effective step's base-2 exponent: the learning rate's, plus the lowest and the highest
    log2 of LoRA's scale over the space's box (alpha and rank apart)."""
    step, by_name = space.step, {p.name: p for p in space.params}
    low, high = math.log2(step.low) + step.step_offset, math.log2(step.high) + step.step_offset
    for name, k in step.step_scale.items():
        ends = [k * math.log2(v) for v in by_name[name].candidates()]
        low, high = low + min(ends), high + max(ends)
    return low, high


def encode(space: SearchSpace, values: dict[str, Value]) -> dict[str, Value]:
    """User values -> Ax parameters, each in the type Ax declared for it."""
    values = space.cast(values)
    encoded = {ax_name(p): _to_exponent(p, values[p.name]) if p.log2_encoded else values[p.name] for p in space.params}
    if (step := space.step) is not None:
        encoded[ax_name(step)] = math.log2(values[step.name]) + _log2_scale(step, values)
    return encoded


def decode(space: SearchSpace, ax_values: dict[str, Value]) -> dict[str, Value]:
    """Ax parameters -> user values. The learning rate of an effective step is the step divided by the
    scale of the decoded alpha and rank; Ax's constraints keep it inside its bounds, up to rounding,
    which the clip takes away."""
    step = space.step
    values = {p.name: _from_exponent(p, ax_values[ax_name(p)]) if p.log2_encoded else ax_values[ax_name(p)]
              for p in space.params if p is not step}
    if step is not None:  # 12 digits: a learning rate given as 2e-4 comes back as 2e-4, not 2.0000000000000001e-4
        lr = float(f"{2 ** (float(ax_values[ax_name(step)]) - _log2_scale(step, values)):.12g}")
        values[step.name] = min(max(lr, step.low), step.high)
    return space.cast({p.name: values[p.name] for p in space.params}, "Ax's suggestion")


def _log2_scale(step: Param, values: dict[str, Value]) -> float:
    """log2 of LoRA's update scale (alpha / rank, or alpha / sqrt(rank)) at these values."""
    return step.step_offset + sum(k * math.log2(values[name]) for name, k in step.step_scale.items())


def _to_exponent(p: Param, value: Value) -> float | int:
    exponent = math.log2(value)
    return int(round(exponent)) if p.kind == "choice" else exponent


def _from_exponent(p: Param, exponent: Value) -> Value:
    if p.kind == "choice":
        return 2 ** int(exponent)
    # floor keeps an integer inside a "<=" product bound that its exponent satisfies
    return int(math.floor(2 ** exponent + 1e-9)) if p.integer else 2 ** exponent


def ax_parameter(p: Param, space: SearchSpace) -> Any:
    from ax import ChoiceParameterConfig, RangeParameterConfig

    if p.step_scale is not None:
        return RangeParameterConfig(name=ax_name(p), bounds=step_bounds(space), parameter_type="float")
    if p.log2_encoded:
        if p.kind == "choice":
            exps = sorted(int(round(math.log2(v))) for v in p.values)
            if exps == list(range(exps[0], exps[-1] + 1)):
                return RangeParameterConfig(name=ax_name(p), bounds=(exps[0], exps[-1]), parameter_type="int")
            return ChoiceParameterConfig(name=ax_name(p), values=exps, parameter_type="int", is_ordered=True)
        return RangeParameterConfig(name=ax_name(p), bounds=(math.log2(p.low), math.log2(p.high)), parameter_type="float")
    if p.kind == "range":
        return RangeParameterConfig(name=p.name, bounds=(p.low, p.high), parameter_type="int" if p.integer else "float",
                                    scaling="log" if p.log else "linear")
    values = p.values
    kind = "bool" if isinstance(values[0], bool) else "str" if isinstance(values[0], str) else "int" if p.integer else "float"
    return ChoiceParameterConfig(name=p.name, values=values, parameter_type=kind,
                                 is_ordered=kind in ("int", "float") and len(values) > 1)


def to_ax(space: SearchSpace) -> tuple[list[Any], list[str]]:
    """Ax parameter configs and constraint strings. Fixed parameters of a constraint move to its
    right-hand side; a product constraint is linear over the base-2 exponents Ax is given."""
    constraints = []
    by_name = {p.name: p for p in space.params}
    for c in space.constraints:
        scale = math.log2 if c.product else float
        bound, terms = scale(c.bound), []
        for name, k in c.terms.items():
            p = by_name[name]
            if p.kind == "fixed":  # a fixed value moves to the right-hand side
                bound -= k * scale(p.values[0])
            else:
                terms.append(f"{k:g}*{ax_name(p)}")
        if terms:
            constraints.append(f"{' + '.join(terms)} {c.op} {bound:.12g}")
    if (step := space.step) is not None:  # the learning rate inside its own bounds: linear in Ax's axes
        terms = " + ".join([f"1*{ax_name(step)}"] + [f"{-k:g}*{ax_name(by_name[name])}" for name, k in step.step_scale.items()])
        constraints += [f"{terms} >= {math.log2(step.low) + step.step_offset:.12g}",
                        f"{terms} <= {math.log2(step.high) + step.step_offset:.12g}"]
    return [ax_parameter(p, space) for p in space.params], constraints
