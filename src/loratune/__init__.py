"""loratune: find the best LoRA fine-tuning hyperparameters with Bayesian optimization (Meta Ax).

    from loratune import run_optimization, resume_optimization, EarlyStoppingCallback, finetune
"""

from .api import export_config, finetune, resume_optimization, run_optimization
from .early_stopping import EarlyStoppingCallback
from .errors import LoratuneError

__version__ = "0.1.0"
__all__ = ["run_optimization", "resume_optimization", "EarlyStoppingCallback", "finetune", "export_config",
           "LoratuneError"]
