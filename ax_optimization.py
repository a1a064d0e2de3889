"""The seed's command and import path, a thin shim over loratune.

    python ax_optimization.py --trials 20 --output configs/optimization_results.json
    python ax_optimization.py --resume configs/optimization_checkpoint.json --trials 10

    from ax_optimization import run_optimization, resume_optimization, EarlyStoppingCallback
"""

import sys

from loratune import EarlyStoppingCallback, resume_optimization, run_optimization  # noqa: F401
from loratune.cli import _non_negative_int, _Parser, add_optimize_arguments, cmd_optimize, cmd_resume, run


def main(argv=None) -> int:
    parser = _Parser(prog="ax_optimization.py", description="Bayesian optimization of LoRA hyperparameters with Meta Ax.")
    add_optimize_arguments(parser)
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue this study; --trials is then the number of additional trials")
    args = parser.parse_args(argv)
    if args.resume:
        args.checkpoint, args.trials = args.resume, _non_negative_int(str(args.trials or 0))
        return run(cmd_resume, args)
    return run(cmd_optimize, args)


if __name__ == "__main__":
    sys.exit(main())
