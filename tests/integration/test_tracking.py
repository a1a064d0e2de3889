"""MLflow tracking: a parent run per study, a child run per trial with its curve, read back with MlflowClient."""

import socket
import subprocess
import sys
import time

import pytest
from conftest import fake_loss

from loratune import resume_optimization, run_optimization

mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional extra: pip install 'loratune[mlflow]'")

SPACE = {"lora_rank": [8, 16, 32, 64], "learning_rate": [1e-5, 5e-4]}


def with_curve(params, report):
    """A trial that streams a three-point learning curve, as a fine-tune does."""
    final = fake_loss(params)
    for k in (1, 2, 3):
        report(k / 3, {"loss": final + 0.1 * (3 - k)})
    return final


def runs(uri: str):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("loratune")
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if r.data.tags.get("loratune.role") == "study"]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId")]
    return client, parents, children


def test_a_study_and_its_resume_in_a_local_store(tmp_path):
    first = run_optimization(num_trials=3, output_dir=tmp_path, evaluate=with_curve, search_space=SPACE, quiet=True,
                             tracking="mlflow", seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, parents, children = runs(uri)
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["loratune.study_id"] == first["study_id"]
    assert parent.data.params["lora.rank"] == "16" and "lora_rank" in parent.data.params["search_space"]
    assert parent.data.metrics["best_loss"] == pytest.approx(first["best_loss"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"OPTIMIZATION_RESULTS.md", "plots"} <= artifacts  # (a fine-tune study adds best_config.yaml)
    for child in children:
        index = int(child.data.tags["loratune.trial"])
        trial = first["trials"][index]
        assert child.data.params == {k: str(v) for k, v in trial["params"].items()}
        assert child.data.tags["loratune.state"] == "completed" and child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2, 3] and history[-1].value == pytest.approx(trial["metrics"]["loss"])
        assert child.data.metrics["final_loss"] == pytest.approx(trial["metrics"]["loss"])

    resume_optimization(tmp_path, additional_trials=2, evaluate=with_curve, quiet=True)
    _, parents, children = runs(uri)
    assert len(parents) == 1 and parents[0].info.run_id == parent.info.run_id  # the same parent run goes on
    assert sorted(int(c.data.tags["loratune.trial"]) for c in children) == [0, 1, 2, 3, 4]  # no duplicates


def test_a_failed_trial_is_a_failed_child_run(tmp_path):
    def evaluate(params):
        if params["learning_rate"] != 2e-4:  # all but the baseline
            raise RuntimeError("CUDA error: device-side assert triggered")
        return 0.5

    run_optimization(num_trials=2, output_dir=tmp_path, evaluate=evaluate, search_space=SPACE, quiet=True,
                     tracking="mlflow", report=False)
    _, _, children = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    failed = [c for c in children if c.data.tags["loratune.state"] == "failed"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert failed[0].data.tags["loratune.reason"] == "RuntimeError: CUDA error: device-side assert triggered"


def test_where_a_stopped_trial_ended_reaches_mlflow(tmp_path):
    """A fine-tune that is stopped reports its last point (on the whole validation set) only in its result."""
    from types import SimpleNamespace

    from loratune.config import StudyConfig
    from loratune.tracking import MlflowTracker, default_uri
    from loratune.trial import TrialRecord, TrialState

    tracker = MlflowTracker(default_uri(tmp_path), "loratune", warn=print)
    tracker.study_started(SimpleNamespace(study_id="s", evaluation="finetune", config=StudyConfig()),
                          SimpleNamespace(directory=tmp_path))
    record = TrialRecord(1, {"lora_rank": 8})
    tracker.trial_started(record)
    streamed = {"step": 4, "progress": 0.1, "val_loss": 1.3, "loss": 1.3}
    tracker.trial_progress(record, point=streamed)
    record.curve = [streamed, {"step": 9, "progress": 0.24, "val_loss": 1.2, "loss": 1.2}]
    record.state, record.metrics = TrialState.EARLY_STOPPED, {"loss": 1.2}
    tracker.trial_ended(record, [record])
    tracker.close()
    client, _, children = runs(default_uri(tmp_path))
    history = client.get_metric_history(children[0].info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(4, 1.3), (9, 1.2)]
    assert children[0].info.status == "KILLED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_study_logged_to_a_real_mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a SQLite backend, started and stopped by this test."""
    import urllib.request

    from loratune.processes import die_with_parent

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=die_with_parent())
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)
        uri = f"http://127.0.0.1:{port}"
        result = run_optimization(num_trials=3, output_dir=tmp_path / "study", evaluate=with_curve, search_space=SPACE,
                                  quiet=True, tracking="mlflow", tracking_uri=uri)
        client, parents, children = runs(uri)
        assert len(parents) == 1 and len(children) == 3
        assert parents[0].data.metrics["best_loss"] == pytest.approx(result["best_loss"])
        assert "best_config.yaml" not in {a.path for a in client.list_artifacts(parents[0].info.run_id)}  # a callable: none
        assert "OPTIMIZATION_RESULTS.md" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
        assert not (tmp_path / "study" / "mlflow.db").exists()  # the server holds it all
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_tracking_server_that_is_down_is_one_warning_and_the_study_goes_on(tmp_path, capsys):
    result = run_optimization(num_trials=3, output_dir=tmp_path, evaluate=fake_loss, search_space=SPACE, report=False,
                              tracking="mlflow", tracking_uri=f"http://127.0.0.1:{free_port()}")
    out = capsys.readouterr().out
    assert [t["state"] for t in result["trials"]] == ["completed"] * 3
    assert out.count("warning") == 1 and "is not reachable; the study runs without tracking" in out


def test_the_final_test_reaches_the_parent_run_beside_the_validation_figures():
    from loratune.tracking import test_metrics

    gain = {"best": 0.66, "baseline": 0.90, "absolute": 0.24, "relative": 0.266}
    test = {"examples": 37, "best": {"trial": 12, "loss": 0.66, "plan_accuracy": 0.2, "generation_s": 0.4},
            "baseline": {"trial": 0, "loss": 0.90, "plan_accuracy": 0.25}, "improvement": {"loss": gain},
            "validation": {"loss": {**gain, "relative": 0.264}}, "held": 1.01}
    assert test_metrics(test) == {"test_best_loss": 0.66, "test_best_plan_accuracy": 0.2, "test_baseline_loss": 0.9,
                                  "test_baseline_plan_accuracy": 0.25, "test_improvement_loss": 0.266,
                                  "validation_improvement_loss": 0.264, "test_held_share": 1.01}
    assert test_metrics({"error": "the test file is gone"}) == {} and test_metrics(None) == {}
