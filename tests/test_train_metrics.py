"""Metrics: JSON lines always; TensorBoard scalars when tensorboard is installed."""
import json

import pytest

from rci_fast.train.metrics import MetricsLog


def test_jsonl_rows_and_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 2.5, "lr": 1e-4, "stage": 0, "skipped": False, "statuses": {"ok": 3}})
    log.write({"step": 2, "loss": 2.0, "lr": 1e-4, "stage": 1, "skipped": False, "statuses": {"ok": 1}})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [2.5, 2.0] and rows[0]["statuses"] == {"ok": 3}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "stage"}  # numbers only, not bools/dicts
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]


def test_a_resumed_run_replaces_the_tensorboard_steps_past_its_checkpoint(tmp_path):
    """Killed after step 4 with a checkpoint at step 2: the resumed run logs steps 3 and 4 again,
    and TensorBoard shows each step once, with the resumed run's values."""
    pytest.importorskip("tensorboard")
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    for step in range(1, 5):
        log.write({"step": step, "loss": float(step)})
    log.close()
    time.sleep(1.1)  # event files are named by the second they were opened
    log = MetricsLog(tmp_path, first_step=3)
    for step in (3, 4, 5):
        log.write({"step": step, "loss": 10.0 * step})
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_without_tensorboard_only_jsonl(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "tb").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 1.0}
