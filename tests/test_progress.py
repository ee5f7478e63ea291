"""Progress lines in logs: unit stages per work item, evaluation, training."""

import logging

from regdpo.progress import ProgressLog
from regdpo.train.observe import progress_line


def test_progress_lines_come_about_every_tenth_and_at_the_end(caplog):
    log = logging.getLogger("regdpo.test")
    progress = ProgressLog(log, "evaluate: samples", 25, unit="videos")
    with caplog.at_level(logging.INFO, logger="regdpo.test"):
        for _ in range(25):
            progress.update()
    done = [int(r.getMessage().split(": ")[2].split("/")[0]) for r in caplog.records]
    assert done == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert caplog.records[-1].getMessage().startswith("evaluate: samples: 25/25 videos (")


def test_a_work_item_of_batches_says_how_far_it_is(tmp_path, caplog):
    from regdpo.stages.units import BatchedUnitWorker, Unit, WorkItem, process_item

    class Worker(BatchedUnitWorker):
        batch_size = 3

        def process_units(self, units, outs):
            return {u.key: {"n": 1} for u in units}

    item = WorkItem("generate", 0, [Unit(f"u{i}", f"{i:016x}", {}) for i in range(10)])
    with caplog.at_level(logging.INFO, logger="regdpo.stages.units"):
        process_item(Worker(), item, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "/10 units" in r.getMessage()]
    assert [line.split(": ")[2].split(" ")[0] for line in lines] == ["3/10", "6/10", "9/10", "10/10"]
    assert lines[0].startswith("generate: work item 0: 3/10 units (")


def test_a_training_line_is_rounded_and_names_skipped_steps_only():
    row = {"step": 9, "loss": 789.23456, "s": -3.14159e-5, "dgr": 494.8, "win_gap": None, "lr": 0.001,
           "skipped": False}
    line = progress_line(row, 200)
    assert line == "step 10/200  loss 789.2  s -3.142e-05  dgr 494.8  lr 0.001"
    assert progress_line({**row, "skipped": True}).endswith("SKIPPED (non-finite loss or gradient)")
