import json

import pytest

from loratune.config import FinetuneConfig
from loratune.errors import LoratuneError
from loratune.training import run_training


def config(tmp_path, **training) -> FinetuneConfig:
    cfg = FinetuneConfig(output_dir=str(tmp_path / "run"))
    cfg.training.learning_rate = 5e-4
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return cfg


def test_demo_finetune_learns_and_writes_adapter_and_metrics(tiny_model, tmp_path):
    metrics = run_training(config(tmp_path, eval_points=10)).to_dict()
    curve = metrics["curve"]
    assert len(curve) == 10 and curve[-1]["progress"] == 1.0
    # the points before the last on the fixed subset (a quarter of the 37, at least 8), the last on all
    assert [p["subset"] for p in curve] == [9] * 9 + [37]
    assert curve[-1]["val_loss"] < 0.85 * curve[0]["val_loss"]  # the adapter learned the task
    assert metrics["val_loss"] == curve[-1]["val_loss"]
    assert (metrics["n_train"], metrics["n_validation"], metrics["steps"]) == (148, 37, 37)
    assert metrics["tokens_seen"] > 10_000 and metrics["tokens_per_s"] > 0 and metrics["peak_memory_gb"] > 0
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["val_loss"] == metrics["val_loss"] and written["config"]["lora"]["rank"] == 16
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_same_seed_same_loss_other_seed_other_loss(tiny_model, tmp_path):
    runs = [run_training(config(tmp_path / str(i), epochs=0.3, seed=seed)).val_loss
            for i, seed in enumerate((1, 1, 2))]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_learning_rate_changes_the_loss(tiny_model, tmp_path):
    low = run_training(config(tmp_path / "a", epochs=0.5, learning_rate=1e-5)).val_loss
    high = run_training(config(tmp_path / "b", epochs=0.5, learning_rate=5e-4)).val_loss
    assert high < low - 0.1


def test_stop_request_ends_training_early(tiny_model, tmp_path):
    checks = iter(range(1000))
    metrics = run_training(config(tmp_path, epochs=0.5), stop_requested=lambda: next(checks) >= 3).to_dict()
    assert metrics["state"] == "early_stopped"
    assert metrics["steps"] == 4 < metrics["planned_steps"]
    assert metrics["curve"][-1]["step"] == 4


def test_existing_run_is_not_overwritten(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"val_loss": 1}')
    with pytest.raises(LoratuneError, match="already holds a run"):
        run_training(config(tmp_path))
    assert (out / "metrics.json").read_text() == '{"val_loss": 1}'


@pytest.mark.parametrize(("name", "message"), [
    ("./no/such/model", "model.name: model directory does not exist: ./no/such/model"),
    ("no-such-org/no-such-model", "model.name: cannot load 'no-such-org/no-such-model'"),
    ("builtin:gpt5", "unknown built-in model"),
])
def test_unreachable_models(tmp_path, name, message):
    cfg = config(tmp_path)
    cfg.model.name = name
    with pytest.raises(LoratuneError) as err:
        run_training(cfg)
    assert message in str(err.value)


def test_gradient_accumulation_auto_keeps_the_effective_batch():
    cfg = FinetuneConfig()
    for bs, accumulation in ((1, 4), (2, 2), (4, 1), (8, 1)):
        cfg.training.batch_size = bs
        assert cfg.training.plan(148)[0] == accumulation
    cfg.training.gradient_accumulation, cfg.training.batch_size = 3, 1
    assert cfg.training.plan(148)[:2] == (3, 50)
    cfg.training.epochs, cfg.training.gradient_accumulation = 0.5, "auto"
    assert cfg.training.plan(148)[1] == 19


def base_and_data(cfg):
    from loratune.data import load_examples
    from loratune.model import load_base

    base = load_base(cfg)
    return base, load_examples(base.tokenizer, cfg.data, cfg.training.seed)


def test_response_only_logits_give_the_models_own_loss(tiny_model, tmp_path):
    import torch

    from loratune.data.batching import collate
    from loratune.losses import can_score_only_responses, row_losses
    from loratune.pack import Pack

    cfg = config(tmp_path)
    base, data = base_and_data(cfg)
    pack = Pack(base, data)
    pack.add("t", cfg)
    model = pack.adapters.model
    assert can_score_only_responses(model)
    batch = collate(data[0][:4], base.tokenizer.pad_token_id)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    model.eval()  # no dropout, so both passes see the same network
    with torch.no_grad():
        full = model(**batch, num_items_in_batch=n_items).loss
        scored = row_losses(model, batch, scored_only=True).sum() / n_items
        unscored = row_losses(model, batch, scored_only=False).sum() / n_items
    assert float(scored) == pytest.approx(float(full), rel=1e-5)
    assert float(unscored) == pytest.approx(float(full), rel=1e-5)
    pack.close()


def test_the_curves_subset_is_fixed_and_the_last_point_uses_every_example(tiny_model, tmp_path):
    from loratune.pack import curve_subset

    cfg = config(tmp_path, epochs=0.2, eval_points=3)
    _, (_, validation) = base_and_data(cfg)
    subset = curve_subset(cfg, validation)
    assert len(subset) == 9 and subset == curve_subset(cfg, validation)  # the same examples at every point
    cfg.training.eval_subset = 1.0
    assert curve_subset(cfg, validation) == validation
    cfg.training.eval_subset = 0.01
    assert len(curve_subset(cfg, validation)) == 8  # never fewer than 8


def test_a_tokenizer_without_pad_and_eos_tokens_trains_with_a_safe_pad_and_says_so(tiny_model, tmp_path, capfd):
    """A Mistral-architecture model whose tokenizer declares no special token at all: collate had no pad id."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    from loratune import finetune

    original = AutoTokenizer.from_pretrained(tiny_model)
    model_dir = tmp_path / "model_nospecial"
    tok = PreTrainedTokenizerFast(tokenizer_object=original.backend_tokenizer)  # no bos/eos/pad/unk declared
    tok.chat_template = original.chat_template
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=len(original), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {model_dir}}}\ntraining: {{epochs: 0.25, batch_size: 2}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    metrics = finetune(config, quiet=True)
    assert metrics["curve"][0]["val_loss"] > metrics["val_loss"]
    assert f"note: {model_dir}: the tokenizer has no pad token; padding with id 0 ('<|endoftext|>'), masked out of " \
           "attention and loss" in capfd.readouterr().err
