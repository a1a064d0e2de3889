"""Our parameter specs: what a study searches, in the user's values.

Users write the short form of Module 4.5 (``lora_rank: [8, 16, 32, 64]``, ``learning_rate: [1e-5, 5e-4]``)
or a mapping (``{low: 1e-5, high: 5e-4, log: true}``, ``{values: [...]}``). Each parameter names a
training-config field: ``lora_rank`` -> ``lora.rank``, ``learning_rate`` -> ``training.learning_rate``,
or a dotted ``section.field``. Constraints between parameters are read in ``constraints.py``.

The space also says which parameters Ax should see as base-2 exponents (those of a product constraint,
LoRA's alpha and rank under the LoRA parameterization) and whether the learning rate is searched as
LoRA's effective step; ``optimizer/encoding.py`` maps values to Ax's parameters and back accordingly.
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from .config import SECTIONS, FinetuneConfig, StudyConfig
from .constraints import Constraint, check_feasible, parse_constraint, satisfies
from .errors import LoratuneError
from .rules import validate
from .schema import coerce, section_fields, unknown_field_message

Value = int | float | str | bool


@dataclass
class Param:
    name: str
    target: str  # dotted training-config field
    kind: str  # "range" | "choice" | "fixed"
    values: list[Value] = field(default_factory=list)  # choice / fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    log2_encoded: bool = False  # given to Ax as a base-2 exponent (for product constraints, LoRA's scale)
    # the learning rate searched as LoRA's effective step (``SearchSpace.step``): base-2 exponent of
    # lr x alpha / rank = log2(lr) + step_offset + sum(k * log2(value of parameter)), k per parameter name
    step_scale: dict[str, float] | None = None
    step_offset: float = 0.0

    def candidates(self) -> list[Value]:
        return self.values if self.kind != "range" else [self.low, self.high]

    def cast(self, value: Any, where: str) -> Value:
        """``value`` as this parameter's own type: the matching choice itself (``32.0`` -> ``32``), an
        int for an integer range, a float for a float range. Ax refuses a value of another type, and
        values arrive as YAML, API arguments or JSON give them."""
        if self.kind != "range":
            for choice in self.values:
                if _same_value(value, choice):
                    return choice
            raise LoratuneError(f"{where}: {value!r} is not one of {self.name}'s values {self.values}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise LoratuneError(f"{where}: {self.name} must be a number, got {value!r}")
        if self.integer:
            if float(value) != int(value):
                raise LoratuneError(f"{where}: {self.name} must be an integer, got {value!r}")
            return int(value)
        return float(value)


@dataclass
class SearchSpace:
    params: list[Param]
    constraints: list[Constraint] = field(default_factory=list)
    parameterization: str = "raw"  # "lora": the learning rate is searched as LoRA's effective step
    note: str | None = None  # why the LoRA parameterization does not apply, where it was asked for

    @property
    def step(self) -> Param | None:
        """The learning rate, where it is searched as LoRA's effective step (see ``lora_parameterization``)."""
        return next((p for p in self.params if p.step_scale is not None), None)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def cast(self, values: dict[str, Any], where: str = "parameters") -> dict[str, Value]:
        """Every searched parameter's value in its own type (see ``Param.cast``); a missing one is an error."""
        missing = [p.name for p in self.params if p.name not in values]
        if missing:
            raise LoratuneError(f"{where}: no value for {', '.join(missing)}")
        return {p.name: p.cast(values[p.name], where) for p in self.params}

    def contains(self, values: dict[str, Value]) -> bool:
        for p in self.params:
            v = values.get(p.name)
            if v is None:
                return False
            if p.kind == "range" and not (p.low <= v <= p.high):
                return False
            if p.kind != "range" and v not in p.values:
                return False
        return all(satisfies(c, values) for c in self.constraints)


def _same_value(a: Any, b: Any) -> bool:
    """Equal and of the same kind: ``32.0`` matches ``32``, but ``True`` never matches ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------
# Parameters


def resolve_target(name: str, where: str) -> str:
    """``lora_rank`` / ``lora.rank`` / ``learning_rate`` -> the dotted training-config field."""
    fields = section_fields()
    if "." in name:
        section, _, fname = name.partition(".")
        if section in fields and fname in fields[section]:
            return name
    for section in SECTIONS:
        if name.startswith(section + "_") and name[len(section) + 1:] in fields[section]:
            return f"{section}.{name[len(section) + 1:]}"
    owners = [s for s in SECTIONS if name in fields[s]]
    if len(owners) == 1:
        return f"{owners[0]}.{name}"
    known = [f"{s}.{f}" for s in SECTIONS for f in fields[s]] + [f"{s}_{f}" for s in SECTIONS for f in fields[s]]
    known += [f for s in SECTIONS for f in fields[s]]
    raise LoratuneError(f"{where}: {unknown_field_message(name, known)}: not a training-config field")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_param(name: str, spec: Any, where: str) -> Param:
    at = f"{where}.{name}"
    target = resolve_target(name, at)
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "values", "value"}
        if unknown:
            raise LoratuneError(f"{at}: {unknown_field_message(sorted(unknown)[0], ['low', 'high', 'log', 'values', 'value'])}")
        if "value" in spec:
            return Param(name, target, "fixed", [spec["value"]])
        if "values" in spec:
            return _choice(name, target, spec["values"], at)
        if "low" not in spec or "high" not in spec:
            raise LoratuneError(f"{at}: a range needs both 'low' and 'high'")
        return _range(name, target, spec["low"], spec["high"], spec.get("log"), at)
    if not isinstance(spec, list):
        spec = [spec]
    if len(spec) == 2 and any(isinstance(v, float) for v in spec) and all(isinstance(v, int | float) for v in spec):
        return _range(name, target, spec[0], spec[1], None, at)
    return _choice(name, target, spec, at)


def _range(name: str, target: str, low: Any, high: Any, log: Any, at: str) -> Param:
    if any(isinstance(b, bool) or not isinstance(b, int | float) for b in (low, high)):
        raise LoratuneError(f"{at}: range bounds must be numbers, got {low!r} and {high!r}")
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise LoratuneError(f"{at}: range bounds must be finite, got {low:g} and {high:g}")
    if not low < high:
        raise LoratuneError(f"{at}: lower bound {low:g} must be below upper bound {high:g}")
    integer = typing.get_type_hints(type(_section(target)))[target.split(".")[1]] is int
    if log is None:  # learning rates and ranges that span orders of magnitude are searched in log space
        log = low > 0 and (target == "training.learning_rate" or high / low >= 100)
    if log and low <= 0:
        raise LoratuneError(f"{at}: a log-scale range needs a positive lower bound, got {low:g}")
    if integer:
        fractional = next((b for b in (low, high) if not b.is_integer()), None)
        if fractional is not None:  # [8, 16.5] is a typo more often than a range meant to hold 8..16
            raise LoratuneError(f"{at}: {target} is an integer, and {fractional:g} is not: write integer bounds "
                                f"for a range ([8, 64]) or list the values for a choice ({{values: [8, 16, 32]}})")
    return Param(name, target, "range", low=low, high=high, log=bool(log), integer=integer)


def _choice(name: str, target: str, values: Any, at: str) -> Param:
    if not isinstance(values, list) or not values:
        raise LoratuneError(f"{at}: empty choice: give at least one value")
    if any(_same_value(a, b) for i, a in enumerate(values) for b in values[i + 1:]):
        raise LoratuneError(f"{at}: choice values repeat: {values}")
    bad = next((v for v in values if not isinstance(v, int | float | str | bool) or
                (isinstance(v, float) and not math.isfinite(v))), None)
    if bad is not None:
        raise LoratuneError(f"{at}: choice values must be finite numbers, strings or booleans, got {bad!r}")
    kinds = {type(v) for v in values}
    if len(kinds) > 1 and not kinds <= {int, float}:
        raise LoratuneError(f"{at}: choice values must all be of one type, got {values}")
    kind = "fixed" if len(values) == 1 else "choice"
    return Param(name, target, kind, list(values), integer=all(_is_int(v) for v in values))


def _section(target: str):
    return getattr(FinetuneConfig(), target.split(".")[0])


def apply(base: FinetuneConfig, values: dict[str, Value], space: SearchSpace, source: str | None = None) -> FinetuneConfig:
    """A copy of ``base`` with the trial's parameter values set on their fields."""
    cfg = copy.deepcopy(base)
    for p in space.params:
        section, fname = p.target.split(".")
        tp = typing.get_type_hints(type(getattr(cfg, section)))[fname]
        value = values[p.name]
        try:
            value = coerce(value, tp)
        except ValueError:
            raise LoratuneError(f"{source or 'search_space'}.{p.name}: value {value!r} does not fit {p.target}") from None
        setattr(getattr(cfg, section), fname, value)
    return cfg


def parse_search_space(spec: Any, constraints: list[str], base: FinetuneConfig, where: str = "search_space",
                       constraints_at: str = "constraints", parameterization: str = "raw") -> SearchSpace:
    if not isinstance(spec, dict) or not spec:
        raise LoratuneError(f"{where}: expected a mapping of parameter names to ranges or choices")
    params = [parse_param(str(name), s, where) for name, s in spec.items()]
    targets = [p.target for p in params]
    for p in params:
        if targets.count(p.target) > 1:
            raise LoratuneError(f"{where}.{p.name}: {p.target} is searched twice")
    _check_values(params, base, where)
    names = [p.name for p in params]
    space = SearchSpace(params, [parse_constraint(c, names, f"{constraints_at}[{i}]") for i, c in enumerate(constraints)])
    _encode_for_products(space)
    check_feasible(space.constraints, {p.name: p.candidates() for p in space.params})
    if parameterization == "lora":
        lora_parameterization(space, base)
    return space


def study_space(cfg: StudyConfig, where: str = "search_space", constraints_at: str = "constraints") -> SearchSpace:
    """A study's search space as Ax searches it (its ``parameterization``)."""
    return parse_search_space(cfg.search_space, cfg.constraints, cfg.base(), where, constraints_at, cfg.parameterization)


LR, ALPHA, RANK, RSLORA = "training.learning_rate", "lora.alpha", "lora.rank", "lora.use_rslora"


def rank_exponent(rslora: bool) -> float:
    """LoRA's update scale is alpha x rank ** this: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    return -0.5 if rslora else -1.0


def lora_scale(alpha: float, rank: float, rslora: bool = False) -> float:
    """LoRA's update scale (what multiplies the adapter's B @ A): alpha / rank, alpha / sqrt(rank) with rsLoRA."""
    return alpha * rank ** rank_exponent(rslora)


def target_of(name: str) -> str | None:
    """The training-config field a search-space name sets (``lora_rank``, ``lora.rank``, ``rank`` ->
    ``lora.rank``), or None for a name that sets none."""
    try:
        return resolve_target(name, "search_space")
    except LoratuneError:
        return None


def lora_parameterization(space: SearchSpace, base: FinetuneConfig) -> None:
    """Search the learning rate as LoRA's effective step, lr x alpha / rank (lr x alpha / sqrt(rank) with
    rsLoRA), on a base-2 log axis whatever the learning rate's own scale, with alpha and rank as base-2
    exponents (an integer range of them is rounded, as for a product constraint): the loss of a LoRA fine-tune
    moves with the step far more than with the three apart, so this puts the ridge of good points along
    one of Ax's axes. Two linear constraints keep every suggested learning rate inside its own bounds, so
    no point outside the user's box is ever proposed. Applies where the learning rate is a range outside
    any constraint and alpha or rank is searched as a range or a choice of consecutive powers of two (the
    other may be fixed); otherwise the space stays as written and ``space.note`` says why."""
    by_target = {p.target: p for p in space.params}
    lr, alpha, rank = by_target.get(LR), by_target.get(ALPHA), by_target.get(RANK)
    searched = [p for p in (alpha, rank) if p is not None and p.kind != "fixed"]
    if lr is None or not searched:
        space.note = ("the learning rate is searched as written, not as LoRA's effective step: "
                      + (f"no {LR.split('.')[1]} is searched" if lr is None else "neither lora_alpha nor lora_rank is searched"))
        return
    in_constraints = {name for c in space.constraints for name in c.terms}
    rslora = by_target.get(RSLORA)
    reason = None
    if lr.kind != "range" or lr.low <= 0:
        reason = f"{lr.name} is not a positive range"
    elif lr.name in in_constraints:
        reason = f"{lr.name} appears in a constraint"
    elif rslora is not None and rslora.kind != "fixed":
        reason = f"{rslora.name} is searched (the scale's form changes with it)"
    else:
        reason = next((why for p in searched if (why := _exponent_axis(p, space, in_constraints))), None)
    if reason:
        space.note = f"the learning rate is searched as written, not as LoRA's effective step: {reason}"
        return
    use_rslora = bool(rslora.values[0]) if rslora is not None else base.lora.use_rslora
    lr.step_scale, lr.step_offset = {}, 0.0
    for p, exponent, fixed in ((alpha, 1.0, base.lora.alpha), (rank, rank_exponent(use_rslora), base.lora.rank)):
        if p is not None and p.kind != "fixed":
            p.log2_encoded = True
            lr.step_scale[p.name] = exponent
        else:
            lr.step_offset += exponent * math.log2(p.values[0] if p is not None else fixed)
    space.parameterization = "lora"


def _exponent_problem(p: Param) -> str | None:
    """Why ``p``'s values cannot go to Ax as base-2 exponents ("positive", "powers of two"); None when they can."""
    values = p.candidates()
    if any(not isinstance(v, int | float) or isinstance(v, bool) or v <= 0 for v in values):
        return "positive"
    if p.kind == "choice" and not all(_is_int(v) and v & (v - 1) == 0 for v in values):
        return "powers of two"
    return None


def _exponent_axis(p: Param, space: SearchSpace, in_constraints: set[str]) -> str | None:
    """Why ``p`` cannot be one of Ax's base-2 exponent axes in a linear constraint; None when it can."""
    problem = _exponent_problem(p)
    if problem == "positive":
        return f"{p.name} is not positive"
    if problem:
        return f"{p.name} is a choice of values that are not powers of two"
    if p.kind == "choice":
        exps = sorted(int(math.log2(v)) for v in p.values)
        if exps != list(range(exps[0], exps[-1] + 1)):
            return f"{p.name} skips a power of two ({p.values})"
    if p.name in in_constraints and not p.log2_encoded:
        return f"{p.name} appears in a linear constraint"
    return None


def _encode_for_products(space: SearchSpace) -> None:
    """Parameters in a product constraint go to Ax as base-2 exponents."""
    by_name = {p.name: p for p in space.params}
    for c in space.constraints:
        for name in c.terms if c.product else ():
            p = by_name[name]
            if p.kind == "fixed":
                continue
            problem = _exponent_problem(p)
            if problem == "positive":
                raise LoratuneError(f"{c.label}: {name} must be positive to appear in a product")
            if problem:
                raise LoratuneError(f"{c.label}: {name} must be a range or a choice of powers of two "
                                    f"to appear in a product, got {p.values}")
            p.log2_encoded = True
    for c in space.constraints:
        if not c.product and any(by_name[n].log2_encoded or by_name[n].log or by_name[n].kind == "choice"
                                 for n in c.terms if by_name[n].kind != "fixed"):
            raise LoratuneError(f"{c.label}: Ax takes linear constraints only over linear-scale ranges; "
                                "write it as a product (e.g. 'a * b <= 128') or make the parameters ranges")



def _check_values(params: list[Param], base: FinetuneConfig, where: str) -> None:
    """Every value of every parameter makes a valid training config: alone (the others as in the base
    config), so that a message names the value at fault whatever the order; then in pairs."""
    def problem(values: dict[str, Value]) -> str | None:
        trial = apply(base, values, SearchSpace([p for p in params if p.name in values]), where)  # names its value
        try:
            validate(trial)
        except LoratuneError as exc:
            return str(exc).split(": ", 1)[-1]
        return None

    for p in params:
        for value in p.candidates():
            if (why := problem({p.name: value})) is not None:
                raise LoratuneError(f"{where}.{p.name}: value {value!r}: {why}")
    for i, p in enumerate(params):
        for q in params[i + 1:]:
            for a in p.candidates():
                for b in q.candidates():
                    if (why := problem({p.name: a, q.name: b})) is not None:
                        raise LoratuneError(f"{where}: {p.name} = {a!r} with {q.name} = {b!r}: {why}")
