"""Module 4.5's retrain command, over loratune:

    python finetune_lora.py --config configs/best_config.yaml
"""

import sys

from loratune.cli import _Parser, add_finetune_arguments, cmd_finetune, run


def main(argv=None) -> int:
    parser = _Parser(prog="finetune_lora.py", description="LoRA fine-tuning from a training config.")
    add_finetune_arguments(parser)
    return run(cmd_finetune, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
