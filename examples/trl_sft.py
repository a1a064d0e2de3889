"""A TRL SFTTrainer + peft LoRA script, tuned by loratune as it stands (``pip install 'loratune[trl]'``).

Tune it on the demo model and data (5 trials; the threshold rule stops a trial whose validation loss is
above the baseline's at 30% of its training)::

    python ax_optimization.py --trials 5 --command "python examples/trl_sft.py" \
        --set early_stopping.threshold=baseline --set early_stopping.check_at=0.3 \
        --output studies/trl_sft/optimization_results.json

Run alone, it trains once on its own defaults: ``python examples/trl_sft.py``.

As in ``hf_trainer.py``, ``trial_params()`` gives the trial's parameters (``{}`` outside a study) and
``LoratuneCallback()`` makes each evaluation the trial's curve point; the last one is its result.
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

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
    parser.add_argument("--output", default="trl_sft_output")
    args = parser.parse_args()
    model_name, train_file, validation_file = demo_files() if args.model is None else (args.model, args.train, args.validation)
    params = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1, **trial_params()}

    data = load_dataset("json", data_files={"train": train_file, "validation": validation_file})
    training = SFTConfig(
        output_dir=args.output, max_steps=args.max_steps, learning_rate=params["learning_rate"],
        per_device_train_batch_size=params["batch_size"], per_device_eval_batch_size=8, max_length=256,
        eval_strategy="steps", eval_steps=args.eval_steps, logging_steps=args.eval_steps,
        save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
    )
    set_seed(0)  # before SFTTrainer makes the model and its adapter (their initial weights), not only for training
    trainer = SFTTrainer(model=model_name, args=training, train_dataset=data["train"], eval_dataset=data["validation"],
                         peft_config=LoraConfig(r=params["lora_rank"], lora_alpha=params["lora_alpha"], task_type="CAUSAL_LM"),
                         callbacks=[LoratuneCallback()])
    trainer.train()


if __name__ == "__main__":
    main()
