"""A plain Hugging Face Trainer + peft LoRA script, tuned by loratune as it stands.

Tune it on the demo model and data (5 trials; the threshold rule stops a trial whose validation loss is
above the baseline's at 30% of its training)::

    python ax_optimization.py --trials 5 --command "python examples/hf_trainer.py" \
        --set early_stopping.threshold=baseline --set early_stopping.check_at=0.3 \
        --output studies/hf_trainer/optimization_results.json

Run alone, it trains once on its own defaults: ``python examples/hf_trainer.py``.

Two lines make it a loratune trial: ``trial_params()`` gives the trial's parameters (``{}`` outside a
study) and ``LoratuneCallback()`` reports each evaluation as the trial's curve point and stops training
when the study says so. Its last evaluation is the trial's result: no JSON line to print.
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)

from loratune.integrations import LoratuneCallback, trial_params


def demo_files():
    """The demo's model (built offline once) and its data files."""
    from loratune.demo.dataset import TRAIN_FILE, VALIDATION_FILE
    from loratune.demo.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model()), str(TRAIN_FILE), str(VALIDATION_FILE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model (default: the demo's tiny Qwen2)")
    parser.add_argument("--train", help="JSONL of chat rows with 'messages' (default: the demo's)")
    parser.add_argument("--validation", help="JSONL of chat rows (default: the demo's)")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--output", default="hf_trainer_output")
    args = parser.parse_args()
    model_name, train_file, validation_file = demo_files() if args.model is None else (args.model, args.train, args.validation)
    params = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1, **trial_params()}

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = load_dataset("json", data_files={"train": train_file, "validation": validation_file})
    data = data.map(lambda row: tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False),
                                          truncation=True, max_length=256),
                    remove_columns=data["train"].column_names)

    set_seed(0)  # before the adapter is made: its initial weights are drawn here, not under Trainer's seed
    model = AutoModelForCausalLM.from_pretrained(model_name)
    model = get_peft_model(model, LoraConfig(r=params["lora_rank"], lora_alpha=params["lora_alpha"],
                                             task_type="CAUSAL_LM"))
    training = TrainingArguments(
        output_dir=args.output, max_steps=args.max_steps, learning_rate=params["learning_rate"],
        per_device_train_batch_size=params["batch_size"], per_device_eval_batch_size=8,
        eval_strategy="steps", eval_steps=args.eval_steps, logging_steps=args.eval_steps,
        save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[LoratuneCallback()])
    trainer.train()


if __name__ == "__main__":
    main()
