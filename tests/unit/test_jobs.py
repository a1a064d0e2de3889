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


def test_a_worker_reads_the_trials_of_one_write_as_one_command():
    """The study writes a pack's trials at once; the worker reads them as one list, so that they start
    training together however its threads are scheduled (``--seed``), and a line cut between two reads
    waits for its end."""
    import os
    import queue
    import threading

    from loratune.worker import read_commands

    read, write = os.pipe()
    commands: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_commands, args=(read, commands))
    reader.start()
    os.write(write, b"/s/trials/1\n/s/trials/2\n/s/tri")
    assert commands.get(timeout=10) == ["/s/trials/1", "/s/trials/2"]
    os.write(write, b"als/3\n")
    assert commands.get(timeout=10) == ["/s/trials/3"]
    os.close(write)
    reader.join(timeout=10)
    os.close(read)
    assert not reader.is_alive() and commands.empty()
