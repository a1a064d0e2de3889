"""Tests on a real instruct model, SmolLM2-135M-Instruct (built offline by ``loratune.demo.smollm2``)."""

import pytest
import torch


def test_smollm2_answers_with_its_chat_template(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings survived the build
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_a_fraction_of_an_epoch_on_smollm2_lowers_its_validation_loss(smollm2, tmp_path):
    """The real path on a real instruct model: its ChatML template with the default system prompt, grouped-
    query attention, tied embeddings; the adapter learns within a few optimizer steps."""
    from loratune.config import FinetuneConfig
    from loratune.data import load_examples
    from loratune.model import load_base
    from loratune.pack import Pack
    from loratune.training import run_training

    cfg = FinetuneConfig(output_dir=str(tmp_path / "run"))
    cfg.model.name = str(smollm2)
    cfg.data.validation_size, cfg.data.validation_path = 12, "builtin:ai_director_validation"
    cfg.training.epochs, cfg.training.learning_rate, cfg.training.eval_points = 0.11, 5e-4, 2
    base = load_base(cfg)
    train, validation = load_examples(base.tokenizer, cfg.data, cfg.training.seed)
    validation = validation[:12]
    pack = Pack(base, (train, validation))
    before = pack.validation_losses([pack.add("untrained", cfg)], validation)["untrained"]
    pack.close()  # the loss of the untrained adapter measured, the same base trains
    metrics = run_training(cfg, base=base, data=(train, validation)).to_dict()
    assert metrics["steps"] == 5 and metrics["val_loss"] < before - 0.05, (before, metrics["val_loss"])
    assert metrics["trainable_params"] > 0 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
