"""Variants of the search that the benchmarks measure against loratune's own and that no study uses:
a lighter acquisition search, and earlier studies' trials modelled as tasks of their own. Kept out of
``Optimizer`` so that the optimizer holds what a study runs."""

from __future__ import annotations

from . import Optimizer, seam

LIGHTER_ACQUISITION_SEARCH = {"raw_samples": 512, "num_restarts": 10}


def use_lighter_acquisition_search(opt: Optimizer) -> None:
    """512 raw samples and 10 restarts for BoTorch's acquisition search instead of Ax's 1024 and 20
    (benchmarks compare the two). Set through Ax's ``model_gen_options`` on the Bayesian
    optimization node, so it is saved with the generation strategy."""
    for spec in opt._model_specs():
        options = spec.generator_gen_kwargs.setdefault("model_gen_options", {})
        options.setdefault("optimizer_kwargs", {}).update(LIGHTER_ACQUISITION_SEARCH)


class MultiTaskOptimizer(Optimizer):
    """An optimizer that models a warm start's trials ({Ax trial index: its study}) as tasks of their own:
    Ax's ``TrialAsTask`` transform makes each study a task and BoTorch fits a ``MultiTaskGP``, which learns
    how far the earlier studies agree with this one, instead of taking their values as this study's. For
    the benchmarks only: on five related surfaces it was worse than the default after 20 trials on three
    (docs/benchmarks.md, "A search that knows LoRA"). Until this study has data of its own, the trials are
    modelled together."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tasks: dict[int, str] = {}  # Ax trial index -> its study; empty: no task of their own

    def model_earlier_studies_as_tasks(self, tasks: dict[int, str]) -> None:
        self.tasks = dict(tasks)

    def _before_ask(self) -> None:
        """The task of every trial Ax knows (the map must name every trial with data, and Ax's target task
        is this study's), given as a new dict so that Ax refits with it."""
        from ax.adapter.registry import MBM_MTGP_trans

        if not self.tasks:
            return
        experiment = seam.experiment(self.client)
        with_data = {int(i) for i in experiment.lookup_data().df["trial_index"].unique()}
        own = sorted(i for i in with_data if i not in self.tasks)
        for spec in self._model_specs():
            configs = {k: v for k, v in spec.generator_kwargs.get("transform_configs", {}).items() if k != "TrialAsTask"}
            if not own:
                spec.generator_kwargs.pop("transforms", None)
            else:
                spec.generator_kwargs["transforms"] = MBM_MTGP_trans
                levels = {i: self.tasks.get(i, "this study") for i in experiment.trials}
                configs["TrialAsTask"] = {"trial_level_map": {"study": levels}, "target_trial": own[0]}
            spec.generator_kwargs["transform_configs"] = configs
