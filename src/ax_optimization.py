"""Module 4.5's optimization command and import path, over loratune:

    python ax_optimization.py --trials 20 --output configs/optimization_results.json
    python ax_optimization.py --resume configs/optimization_checkpoint.json --trials 10

    from ax_optimization import run_optimization, resume_optimization, EarlyStoppingCallback
"""

import sys

from loratune import EarlyStoppingCallback, resume_optimization, run_optimization  # noqa: F401
from loratune.cli import _Parser, add_optimize_arguments, cmd_optimize, cmd_resume, run
from loratune.errors import USAGE_EXIT_CODE

# what --resume cannot take: they would change what the study measures, or where it lives
NOT_ON_RESUME = ("config", "model", "data", "seed", "command", "output", "overwrite", "executor", "ray_address",
                 "shared_dir")


def main(argv=None) -> int:
    parser = _Parser(prog="ax_optimization.py", description="Bayesian optimization of LoRA hyperparameters with Meta Ax.")
    add_optimize_arguments(parser)
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue this study; --trials is then the number of "
                                                               "additional trials")
    args = parser.parse_args(argv)
    if not args.resume:
        return run(cmd_optimize, args)
    given = [name for name in NOT_ON_RESUME if getattr(args, name) not in (None, False)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        print(f"error: {flag}: cannot change when a study resumes; --resume takes --trials (additional), --workers, "
              "--gpus, --gpus-per-trial, --trial-timeout, --no-reuse-model, --set for those, --no-report, --quiet",
              file=sys.stderr)
        return USAGE_EXIT_CODE
    args.checkpoint, args.trials = args.resume, args.trials or 0
    return run(cmd_resume, args)


if __name__ == "__main__":
    sys.exit(main())
