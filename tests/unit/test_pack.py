"""Packed trials: the same config gives the same curve packed as alone, each trial ends on its own, and a
trial's adapter saves and loads as an ordinary peft adapter."""

import math

import pytest

from loratune.config import FinetuneConfig

# rank, alpha, learning rate, dropout, batch size: every setting a trial of the default search varies
SETTINGS = [(8, 16, 3e-4, 0.0, 1), (16, 32, 2e-4, 0.05, 2), (32, 16, 1e-4, 0.1, 4), (4, 64, 5e-4, 0.05, 1)]


def configs(tmp_path, epochs=0.3) -> list[FinetuneConfig]:
    out = []
    for i, (rank, alpha, lr, dropout, batch) in enumerate(SETTINGS):
        cfg = FinetuneConfig(output_dir=str(tmp_path / f"t{i}"))
        cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = rank, alpha, dropout
        cfg.training.learning_rate, cfg.training.batch_size, cfg.training.epochs = lr, batch, epochs
        cfg.training.eval_points = 3
        out.append(cfg)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from loratune.data import load_examples
    from loratune.model import load_base

    cfg = FinetuneConfig()
    base = load_base(cfg)
    return base, load_examples(base.tokenizer, cfg.data, cfg.training.seed)


def train(pack, trials):
    while any(not t.done and t.error is None for t in trials):
        pack.round()


def test_four_trials_packed_give_every_curve_point_they_give_alone(loaded, tmp_path):
    from loratune.pack import Pack

    base, data = loaded
    alone = []
    for i, cfg in enumerate(configs(tmp_path)):
        pack = Pack(base, data)
        trial = pack.add(f"t{i}", cfg)
        train(pack, [trial])
        alone.append(([(p.step, p.val_loss, p.train_loss) for p in trial.curve], trial.tokens))
        pack.close()
    pack = Pack(base, data)
    trials = [pack.add(f"t{i}", cfg) for i, cfg in enumerate(configs(tmp_path))]
    assert len({id(t.params[0]) for t in trials}) == 4  # four adapters on one base
    train(pack, trials)
    for (curve, tokens), trial in zip(alone, trials, strict=True):
        packed = [(p.step, p.val_loss, p.train_loss) for p in trial.curve]
        assert [s for s, _, _ in packed] == [s for s, _, _ in curve] and trial.tokens == tokens
        for (_, val, tr), (_, pval, ptr) in zip(curve, packed, strict=True):
            assert pval == pytest.approx(val, rel=1e-4) and ptr == pytest.approx(tr, rel=1e-4)
    # the adapters learned something different from each other: the comparison is not of equal curves
    assert len({round(t.curve[-1].val_loss, 4) for t in trials}) == 4
    pack.close()
    assert not hasattr(base.model, "peft_config")  # the base is left as it was loaded


def test_a_trial_that_fails_or_stops_leaves_the_pack_and_the_others_train_on(loaded, tmp_path):
    from loratune.pack import Hooks, Pack

    class StopAtFirstPoint(Hooks):
        def on_point(self, point):
            return True

        def verdict(self):
            return True

    base, data = loaded
    cfgs = configs(tmp_path)
    cfgs[1].training.learning_rate = 1e6  # diverges: a non-finite loss of its own
    pack = Pack(base, data)
    trials = [pack.add(f"t{i}", c, StopAtFirstPoint() if i == 2 else None) for i, c in enumerate(cfgs)]
    train(pack, trials)
    assert isinstance(trials[1].error, FloatingPointError)
    assert trials[2].stopped and trials[2].step < trials[2].steps and trials[2].curve[-1].subset == len(data[1])
    for t in (trials[0], trials[3]):
        assert t.done and not t.stopped and t.error is None and t.step == t.steps
        assert math.isfinite(t.curve[-1].val_loss)
    pack.close()


def test_a_packed_trials_adapter_is_an_ordinary_peft_adapter(loaded, tmp_path):
    from loratune.pack import Pack
    from loratune.training import score_adapter

    base, data = loaded
    cfgs = configs(tmp_path, epochs=0.1)
    pack = Pack(base, data)
    trials = [pack.add(f"t{i}", c) for i, c in enumerate(cfgs[:2])]
    train(pack, trials)
    packed = pack.validation_losses(trials, data[1])
    for t in trials:
        pack.adapters.save(t.name, tmp_path / t.name)
    pack.close()
    for t in trials:
        assert (tmp_path / t.name / "adapter_model.safetensors").exists()
        loaded_loss = score_adapter(t.cfg, base, tmp_path / t.name, data[1], answer=False)["loss"]
        assert loaded_loss == pytest.approx(packed[t.name], rel=1e-5)


def test_trials_that_join_and_leave_a_running_pack_train_as_they_do_alone(loaded, tmp_path):
    """A trial leaves mid-way (its adapter deleted) and another joins: the ones still in the pack keep
    training (peft marks only its active adapter trainable after each change) and match their runs alone."""
    from loratune.pack import Pack

    base, data = loaded
    cfgs = configs(tmp_path, epochs=0.2)
    alone = {}
    for i in (0, 2):
        pack = Pack(base, data)
        trial = pack.add(f"t{i}", cfgs[i])
        train(pack, [trial])
        alone[i] = trial.curve[-1].val_loss
        pack.close()
    pack = Pack(base, data)
    first, leaving = pack.add("t0", cfgs[0]), pack.add("t1", cfgs[1])
    for _ in range(3):
        pack.round()
    pack.remove(leaving)
    joining = pack.add("t2", cfgs[2])
    train(pack, [first, joining])
    assert first.curve[-1].val_loss == pytest.approx(alone[0], rel=1e-4)
    assert joining.curve[-1].val_loss == pytest.approx(alone[2], rel=1e-4)
    pack.close()
