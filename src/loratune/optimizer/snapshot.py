"""Ax's state as JSON, encoded incrementally: what ``Client.save_to_json_file`` writes, with the encoding of
every trial in a final state kept from one save to the next instead of made again each time."""

from __future__ import annotations

from typing import Any, NamedTuple

from . import seam


class _EncodedTrial(NamedTuple):
    """A trial in a final state as the snapshot encoded it, and what the encoding was made from."""
    trial: Any
    rows: list  # its data rows (Ax's DataRow objects) at the time
    trial_json: dict
    data_json: Any


class Snapshots:
    """Encodes one client's state again and again, reusing what has not changed."""

    def __init__(self):
        self._trials: dict[int, _EncodedTrial] = {}  # by trial index
        # id(generator run) -> (the run, its JSON); holding the run keeps its id from being reused
        self._runs: dict[int, tuple[Any, Any]] = {}

    def encode(self, client: Any) -> dict:
        """Ax's experiment and generation strategy as JSON: what ``Client.save_to_json_file`` writes, less
        the generation strategy's own copy of the experiment (``Client`` decodes the strategy with the
        experiment it decoded first and never reads that copy).

        Ax encodes every trial, its data and its generator run again at each save, which grows with the
        study (docs/benchmarks.md, "Optimizer cost at scale"). Here a trial in a terminal state
        (``TrialStatus.is_terminal``: Ax's Client moves none back) keeps its encoding while its data rows
        are the same objects (Ax replaces a row it updates), and a generator run keeps its encoding once its
        arms are named. The result equals Ax's own encoding (tested); it shares those parts with other
        snapshots, so it is read, never changed in place."""
        from ax.storage.json_store.encoders import experiment_to_dict, generation_strategy_to_dict
        from ax.storage.json_store.registry import CORE_ENCODER_REGISTRY

        experiment, strategy = seam.experiment(client), seam.generation_strategy(client, maybe=True)
        if CORE_ENCODER_REGISTRY.get(type(experiment)) is not experiment_to_dict or strategy is None or \
                CORE_ENCODER_REGISTRY.get(type(strategy)) is not generation_strategy_to_dict:
            # not the experiment and strategy loratune makes (nor a custom encoder registry, which
            # loratune never sets): Ax's own encoding, all of it
            snapshot = seam.to_json_snapshot(client)
            if isinstance(snapshot.get("generation_strategy"), dict):
                snapshot["generation_strategy"]["experiment"] = None
            return snapshot
        return {"_type": type(client).__name__, "experiment": self._experiment_json(experiment),
                "generation_strategy": self._strategy_json(strategy)}

    def _experiment_json(self, experiment: Any) -> dict:
        """The experiment's JSON, each trial's and its data's kept from the last save where they are the same."""
        from ax.storage.json_store.encoder import object_to_json
        from ax.storage.json_store.encoders import experiment_to_dict

        fields = experiment_to_dict(experiment)  # one level deep: trials and data are still Ax objects
        rows: dict[int, list] = {}
        for row in seam.data_rows(experiment.data):
            rows.setdefault(row.trial_index, []).append(row)
        trials, data = {}, {}
        for index, trial in fields["trials"].items():
            trials[index], data_json = self._trial_json(index, trial, rows.get(index, []), fields["data_by_trial"])
            if data_json is not None:
                data[index] = data_json
        encoded = {"trials": trials, "data_by_trial": data}
        return {key: encoded[key] if key in encoded else object_to_json(value) for key, value in fields.items()}

    def _trial_json(self, index: int, trial: Any, its_rows: list, data_by_trial: dict) -> tuple[dict, Any]:
        """A trial's JSON and its data's (None without data): as last saved while it is the same trial in a
        final state with the same data rows, else encoded again (and kept once final)."""
        from ax.storage.json_store.encoder import object_to_json
        from ax.storage.json_store.registry import CORE_ENCODER_REGISTRY

        kept = self._trials.get(index)
        if kept is not None and kept.trial is trial and len(kept.rows) == len(its_rows) and \
                all(a is b for a, b in zip(kept.rows, its_rows, strict=True)):
            return kept.trial_json, kept.data_json
        trial_fields = CORE_ENCODER_REGISTRY[type(trial)](trial)
        trial_json = {key: self._run_json(value) if key == "generator_run" and value is not None
                      else object_to_json(value) for key, value in trial_fields.items()}
        data_json = object_to_json(data_by_trial[index]) if index in data_by_trial else None
        if trial.status.is_terminal:
            self._trials[index] = _EncodedTrial(trial, its_rows, trial_json, data_json)
        return trial_json, data_json

    def _strategy_json(self, strategy: Any) -> dict:
        """The generation strategy's JSON, without its own copy of the experiment."""
        from ax.storage.json_store.encoder import object_to_json
        from ax.storage.json_store.encoders import generation_strategy_to_dict

        parts = generation_strategy_to_dict(strategy)
        parts["experiment"] = None
        return {key: [self._run_json(run) for run in value] if key == "generator_runs"
                else object_to_json(value) for key, value in parts.items()}

    def _run_json(self, run: Any) -> Any:
        """A generator run's JSON, kept once its arms are named (when its trial was made; fixed from then on)."""
        from ax.storage.json_store.encoder import object_to_json

        kept = self._runs.get(id(run))
        if kept is not None and kept[0] is run:
            return kept[1]
        encoded = object_to_json(run)
        if all(arm.has_name for arm in run.arms):
            self._runs[id(run)] = (run, encoded)
        return encoded
