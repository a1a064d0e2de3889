import itertools
import math

import pytest

from loratune.config import FinetuneConfig, default_search_space
from loratune.constraints import satisfies
from loratune.errors import LoratuneError
from loratune.optimizer.encoding import decode, encode, to_ax
from loratune.search_space import apply, parse_search_space, resolve_target


def space(spec=None, constraints=()):
    return parse_search_space(spec or default_search_space(), list(constraints), FinetuneConfig())


def test_default_space_forms():
    s = space()
    rank, alpha, lr, bs = s.params
    assert (rank.kind, rank.values, rank.target) == ("choice", [8, 16, 32, 64], "lora.rank")
    assert alpha.target == "lora.alpha"
    assert (lr.kind, lr.low, lr.high, lr.log, lr.target) == ("range", 1e-5, 5e-4, True, "training.learning_rate")
    assert (bs.kind, bs.values, bs.target) == ("choice", [1, 2, 4], "training.batch_size")


def test_custom_space_forms():
    s = space({"lora_rank": [16], "lora_alpha": [32], "learning_rate": [5e-5, 3e-4], "batch_size": [1, 2]})
    assert [p.kind for p in s.params] == ["fixed", "fixed", "range", "choice"]


@pytest.mark.parametrize(("name", "target"), [
    ("lora_rank", "lora.rank"), ("lora.dropout", "lora.dropout"), ("weight_decay", "training.weight_decay"),
    ("training_epochs", "training.epochs"), ("data_max_length", "data.max_length"),
])
def test_any_training_field_can_be_searched(name, target):
    assert resolve_target(name, "search_space") == target


def test_apply_sets_fields_with_their_types():
    cfg = apply(FinetuneConfig(), {"lora_rank": 32, "lora_alpha": 64, "learning_rate": 1e-4, "batch_size": 2}, space())
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.training.learning_rate, cfg.training.batch_size) == (32, 64.0, 1e-4, 2)
    assert isinstance(cfg.lora.alpha, float)


@pytest.mark.parametrize(("spec", "message"), [
    ({"learning_rate": [5e-4, 1e-5]}, "search_space.learning_rate: lower bound 0.0005 must be below upper bound 1e-05"),
    ({"lora_rank": []}, "search_space.lora_rank: empty choice"),
    ({"lora_rank": [0, 8]}, "search_space.lora_rank: value 0: must be a positive integer"),
    ({"learning_rate": [0.0, 1e-3]}, "search_space.learning_rate: value 0.0: must be > 0"),
    ({"lora_rnak": [8, 16]}, "search_space.lora_rnak: unknown field 'lora_rnak' (did you mean 'lora_rank'?)"),
    ({"lora_rank": ["big", "small"]}, "search_space.lora_rank: value 'big' does not fit lora.rank"),
    ({"learning_rate": {"low": 1e-5}}, "a range needs both 'low' and 'high'"),
])
def test_impossible_search_spaces(spec, message):
    with pytest.raises(LoratuneError) as err:
        space(spec)
    assert message in str(err.value)


@pytest.mark.parametrize("spec", [{"lora_alpha": [16, 32], "lora_dropout": [-0.1, 0.2]},
                                  {"lora_dropout": [-0.1, 0.2], "lora_alpha": [16, 32]}], ids=["after", "before"])
def test_a_bad_value_is_blamed_on_its_own_parameter_whatever_the_order(spec):
    with pytest.raises(LoratuneError) as err:
        space(spec)
    assert str(err.value) == "search_space.lora_dropout: value -0.1: must be in [0, 1), got -0.1"


def test_product_constraint_goes_to_ax_in_log2_space():
    s = space(constraints=["lora_rank * batch_size <= 128"])
    params, constraints = to_ax(s)
    assert [p.name for p in params] == ["log2_lora_rank", "lora_alpha", "learning_rate", "log2_batch_size"]
    assert constraints == ["1*log2_lora_rank + 1*log2_batch_size <= 7"]
    # the encoding is exact: every decoded point that Ax may propose satisfies the product
    for r, b in itertools.product(range(3, 7), range(0, 3)):
        values = decode(s, {"log2_lora_rank": r, "lora_alpha": 16, "learning_rate": 1e-4, "log2_batch_size": b})
        assert satisfies(s.constraints[0], values) == (r + b <= 7)
        assert encode(s, values)["log2_lora_rank"] == r


def test_linear_constraint_passes_through():
    s = space({"lora_dropout": [0.0, 0.3], "weight_decay": [0.0, 0.1]}, ["lora_dropout + 2 * weight_decay <= 0.4"])
    assert to_ax(s)[1] == ["1*lora_dropout + 2*weight_decay <= 0.4"]


@pytest.mark.parametrize(("constraint", "message"), [
    ("lora_rank * batch_sise <= 128", "unknown field 'batch_sise' (did you mean 'batch_size'?)"),
    ("lora_rank * batch_size <= 4", "no point of the search space satisfies it"),
    ("lora_rank ** batch_size <= 128", "only numbers, parameter names, +, - and * are allowed"),
    ("lora_rank * batch_size <=", "syntax error"),
    ("__import__('os').system('true') <= 1", "only numbers, parameter names"),
    ("lora_rank * batch_size + lora_alpha <= 128", "only linear constraints or a single product"),
])
def test_bad_constraints(constraint, message):
    with pytest.raises(LoratuneError) as err:
        space(constraints=[constraint])
    assert message in str(err.value)


def test_values_are_cast_to_their_parameters_types_before_they_reach_ax():
    s = space()
    # YAML, the API and JSON give 32.0 for a float field such as lora.alpha: Ax wants the choice's int
    cast = s.cast({"lora_rank": 16.0, "lora_alpha": 32.0, "learning_rate": 2e-4, "batch_size": 1})
    assert cast == {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1}
    assert all(type(v) is int for k, v in cast.items() if k != "learning_rate")
    assert type(encode(s, {**cast, "learning_rate": 1})["learning_rate"]) is float
    with pytest.raises(LoratuneError, match="baseline: 24 is not one of lora_rank's values"):
        s.cast({**cast, "lora_rank": 24}, "baseline")
    with pytest.raises(LoratuneError, match="baseline: no value for batch_size"):
        s.cast({k: v for k, v in cast.items() if k != "batch_size"}, "baseline")


# -- the LoRA parameterization: the learning rate searched as LoRA's effective step ------------------

def lora_space(spec=None, constraints=(), base=None):
    return parse_search_space(spec or default_search_space(), list(constraints), base or FinetuneConfig(),
                              parameterization="lora")


def box_points(s, lrs=(1e-5, 3.3e-5, 2e-4, 5e-4)):
    """Every combination of the choices with learning rates across the range (its bounds included)."""
    others = [p for p in s.params if p.name != "learning_rate"]
    for combo in itertools.product(*(p.values if p.kind == "choice" else p.candidates() for p in others), lrs):
        yield dict(zip([p.name for p in others] + ["learning_rate"], combo, strict=True))


def test_the_lora_parameterization_maps_the_users_box_both_ways():
    s = lora_space(constraints=["lora_rank * batch_size <= 128"])
    assert s.parameterization == "lora" and s.note is None
    params, constraints = to_ax(s)
    assert [p.name for p in params] == ["log2_lora_rank", "log2_lora_alpha", "log2_effective_learning_rate", "log2_batch_size"]
    # the step's bounds: the learning rate's times the smallest and largest alpha / rank (16/64 and 128/8)
    assert params[2].bounds == pytest.approx((math.log2(1e-5) - 2, math.log2(5e-4) + 4))
    assert constraints == ["1*log2_lora_rank + 1*log2_batch_size <= 7",
                          f"1*log2_effective_learning_rate + -1*log2_lora_alpha + 1*log2_lora_rank >= {math.log2(1e-5):.12g}",
                          f"1*log2_effective_learning_rate + -1*log2_lora_alpha + 1*log2_lora_rank <= {math.log2(5e-4):.12g}"]
    baseline = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1}
    assert encode(s, baseline) == pytest.approx({"log2_lora_rank": 4, "log2_lora_alpha": 5,
                                                "log2_effective_learning_rate": math.log2(2e-4 * 32 / 16), "log2_batch_size": 0})
    for values in box_points(s):
        assert decode(s, encode(s, values)) == values  # exactly: a learning rate of 2e-4 comes back as 2e-4


def test_every_point_ax_may_propose_under_the_lora_parameterization_is_inside_the_users_box():
    s = lora_space()
    _, constraints = to_ax(s)
    lo, hi = (float(c.rsplit(" ", 1)[1]) for c in constraints)
    steps = [math.log2(1e-5) - 2 + k * (math.log2(5e-4) + 4 - math.log2(1e-5) + 2) / 40 for k in range(41)]
    inside = 0
    for r, a, e, b in itertools.product(range(3, 7), range(4, 8), steps, (1, 2, 4)):
        if not lo - 1e-9 <= e - a + r <= hi + 1e-9:
            continue  # Ax's constraints never propose it
        values = decode(s, {"log2_lora_rank": r, "log2_lora_alpha": a, "log2_effective_learning_rate": e, "batch_size": b})
        assert s.contains(values) and values["learning_rate"] * values["lora_alpha"] / values["lora_rank"] == pytest.approx(2 ** e)
        inside += 1
    assert inside > 900  # of the 1,968 points of the grid


@pytest.mark.parametrize(("spec", "lora", "scale", "offset"), [
    ({"lora_alpha": [16, 32, 64], "learning_rate": [1e-5, 5e-4]}, {}, {"lora_alpha": 1}, -4),  # rank 16 fixed
    ({"lora_rank": {"low": 4, "high": 64}, "learning_rate": [1e-5, 5e-4]}, {}, {"lora_rank": -1}, 5),  # alpha 32
    ({"lora_rank": [8, 16, 32], "lora_alpha": [16.0, 64.0], "learning_rate": [1e-5, 5e-4]}, {"use_rslora": True},
     {"lora_alpha": 1, "lora_rank": -0.5}, 0),
    ({"lora_rank": [8, 16], "lora_alpha": [32], "learning_rate": [1e-5, 5e-4]}, {}, {"lora_rank": -1}, 5),
])
def test_the_effective_step_follows_what_is_searched_and_what_is_fixed(spec, lora, scale, offset):
    from loratune.config import LoraConfig

    s = lora_space(spec, base=FinetuneConfig(lora=LoraConfig(**lora)))
    step = s.step
    assert (step.step_scale, step.step_offset) == (scale, pytest.approx(offset))
    for values in box_points(s, lrs=(1e-5, 7e-5, 5e-4)):
        assert decode(s, encode(s, values)) == {**values, "learning_rate": pytest.approx(values["learning_rate"])}


@pytest.mark.parametrize(("spec", "constraints", "why"), [
    ({"lora_rank": [8, 12, 16], "learning_rate": [1e-5, 5e-4]}, [], "lora_rank is a choice of values that are not powers of two"),
    ({"lora_rank": [8, 32], "learning_rate": [1e-5, 5e-4]}, [], "lora_rank skips a power of two"),
    ({"lora_rank": [8, 16], "learning_rate": [1e-4, 2e-4, 3e-4]}, [], "learning_rate is not a positive range"),
    ({"lora_rank": [8, 16], "learning_rate": [1e-5, 5e-4], "lora_use_rslora": [True, False]}, [], "lora_use_rslora is searched"),
    ({"lora_alpha": [8.0, 64.0], "lora_dropout": [0.0, 0.2], "learning_rate": [1e-5, 5e-4]},
     ["lora_alpha + lora_dropout <= 40"], "lora_alpha appears in a linear constraint"),
])
def test_where_the_lora_parameterization_cannot_apply_the_space_stays_as_written_and_says_why(spec, constraints, why):
    s = lora_space(spec, constraints)
    assert s.parameterization == "raw" and s.step is None
    assert s.note.startswith("the learning rate is searched as written") and why in s.note
    assert to_ax(s) == to_ax(space(spec, constraints))


def test_raw_and_spaces_without_loras_scale_are_searched_as_written():
    assert space().step is None and space().note is None
    s = lora_space({"learning_rate": [1e-5, 5e-4], "batch_size": [1, 2, 4]})
    assert (s.parameterization, s.step) == ("raw", None) and s.note.endswith("neither lora_alpha nor lora_rank is searched")
    assert lora_space({"lora_rank": [8, 16], "batch_size": [1, 2]}).note.endswith("no learning_rate is searched")
