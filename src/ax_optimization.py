"""Module 4.5's optimization command and import path, over loratune:

    python ax_optimization.py --trials 20 --output configs/optimization_results.json
    python ax_optimization.py --resume configs/optimization_checkpoint.json --trials 10

    from ax_optimization import run_optimization, resume_optimization, EarlyStoppingCallback
"""

import sys

from loratune import EarlyStoppingCallback, resume_optimization, run_optimization  # noqa: F401
from loratune.cli import _Parser, add_optimize_arguments, cmd_optimize, cmd_resume, refused_on_resume, run
from loratune.errors import USAGE_EXIT_CODE


def main(argv=None) -> int:
    parser = _Parser(prog="ax_optimization.py", description="Bayesian optimization of LoRA hyperparameters with Meta Ax.")
    add_optimize_arguments(parser)
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue this study; --trials is then the number of "
                                                               "additional trials")
    args = parser.parse_args(argv)
    if not args.resume:
        return run(cmd_optimize, args)
    refused = refused_on_resume(args, also=("resume",))  # what `loratune resume` takes, --resume takes
    if refused:
        print(refused, file=sys.stderr)
        return USAGE_EXIT_CODE
    args.checkpoint, args.trials = args.resume, args.trials or 0
    return run(cmd_resume, args)


if __name__ == "__main__":
    sys.exit(main())
