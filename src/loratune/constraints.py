"""Parameter constraints as users write them: ``lora_rank * batch_size <= 128``, ``2*a + b >= 3``.

A constraint is read without evaluating user text, into either a linear form (a coefficient per
parameter) or a single product of parameters (an exponent per parameter). Ax only takes linear
constraints: the parameters of a product go to Ax as base-2 exponents (``search_space.py`` marks them,
``optimizer/encoding.py`` writes the product as a sum of exponents), so Ax never proposes a point that
breaks it.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import LoratuneError
from .schema import unknown_field_message


@dataclass
class Constraint:
    text: str
    terms: dict[str, float]  # linear: coefficient per parameter; product: exponent per parameter
    op: str  # "<=" or ">="
    bound: float
    product: bool
    label: str = ""  # where it was written, for messages: "c.yaml: constraints[0]: 'a * b <= 128'"


def satisfies(c: Constraint, values: Mapping[str, Any]) -> bool:
    if c.product:
        lhs = math.prod(float(values[n]) ** e for n, e in c.terms.items())
    else:
        lhs = sum(k * float(values[n]) for n, k in c.terms.items())
    tol = 1e-9 * max(1.0, abs(c.bound))
    return lhs <= c.bound + tol if c.op == "<=" else lhs >= c.bound - tol


def parse_constraint(text: str, names: Sequence[str], at: str = "constraints") -> Constraint:
    """Parse ``a * b <= 128`` or ``2*a + b >= 3`` over the searched parameters ``names`` without
    evaluating user text; ``at``: where it was written."""
    where = f"{at}: '{text}'"
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise LoratuneError(f"{where}: syntax error; write e.g. 'lora_rank * batch_size <= 128'") from None
    if not (isinstance(tree, ast.Compare) and len(tree.ops) == 1 and type(tree.ops[0]) in (ast.LtE, ast.GtE, ast.Lt, ast.Gt)):
        raise LoratuneError(f"{where}: must be one comparison with <= or >=")
    op = "<=" if isinstance(tree.ops[0], ast.LtE | ast.Lt) else ">="
    lhs, rhs = _polynomial(tree.left, names, where), _polynomial(tree.comparators[0], names, where)
    poly = dict(lhs)
    for mono, k in rhs.items():
        poly[mono] = poly.get(mono, 0.0) - k
    bound = -poly.pop((), 0.0)
    poly = {m: k for m, k in poly.items() if k != 0}
    if not poly:
        raise LoratuneError(f"{where}: names no parameter")
    if all(len(m) <= 1 for m in poly):
        linear = {m[0]: k for m, k in poly.items()}
        return Constraint(text, {n: linear[n] for n in names if n in linear}, op, bound, product=False, label=where)
    if len(poly) == 1:
        (mono, k), = poly.items()
        if k < 0:
            op, k, bound = ("<=" if op == ">=" else ">="), -k, -bound
        if bound <= 0:
            raise LoratuneError(f"{where}: a product of parameters must be compared with a positive number")
        terms = {n: float(mono.count(n)) for n in names if n in mono}
        return Constraint(text, terms, op, bound / k, product=True, label=where)
    raise LoratuneError(f"{where}: only linear constraints or a single product of parameters are supported")


def _polynomial(node: ast.AST, names: Sequence[str], where: str) -> dict[tuple[str, ...], float]:
    """A sum of monomials: {(sorted names...): coefficient}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return {(): float(node.value)}
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise LoratuneError(f"{where}: {unknown_field_message(node.id, names)}: not a searched parameter")
        return {(node.id,): 1.0}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return {m: -k for m, k in _polynomial(node.operand, names, where).items()}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult):
        a, b = _polynomial(node.left, names, where), _polynomial(node.right, names, where)
        if isinstance(node.op, ast.Mult):
            out: dict[tuple[str, ...], float] = {}
            for ma, ka in a.items():
                for mb, kb in b.items():
                    m = tuple(sorted(ma + mb))
                    out[m] = out.get(m, 0.0) + ka * kb
            return out
        sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
        out = dict(a)
        for m, k in b.items():
            out[m] = out.get(m, 0.0) + sign * k
        return out
    raise LoratuneError(f"{where}: only numbers, parameter names, +, - and * are allowed")


def check_feasible(constraints: list[Constraint], candidates: Mapping[str, list[Any]]) -> None:
    """Refuse a constraint that no point satisfies, the points drawn from each parameter's ``candidates``
    (a range's ends, a choice's values), in order."""
    grid = [[]]
    for values in candidates.values():
        grid = [g + [v] for g in grid for v in values][:20000]
    names = list(candidates)
    for c in constraints:
        if not any(satisfies(c, dict(zip(names, g, strict=True))) for g in grid):
            raise LoratuneError(f"{c.label}: no point of the search space satisfies it")
