"""Jobs no search waits on (the final test, a comparison's retrains): one loop submits them within the
executor's slots and hands each back as it ends."""

from pathlib import Path

from loratune.executors import Event, TrialSpec, run_to_end
from loratune.trial import TrialResult, TrialState


class TwoSlots:
    """Ends its oldest running job at each poll."""

    slots = 2

    def __init__(self):
        self.running, self.most = [], 0

    def submit(self, spec):
        self.running.append(spec.index)
        self.most = max(self.most, len(self.running))

    def poll(self, timeout):
        return [Event(self.running.pop(0), result=TrialResult(TrialState.COMPLETED, {"loss": 1.0}))]


def test_jobs_run_within_the_slots_and_each_comes_back_once():
    executor, submitted = TwoSlots(), []
    specs = [TrialSpec(i, {}, Path(f"/tmp/job{i}")) for i in (7, 3, 5)]
    ended = [spec.index for spec, _ in run_to_end(executor, specs, lambda s: submitted.append(s.index))]
    assert submitted == [7, 3, 5] and ended == [7, 3, 5] and executor.most == 2
