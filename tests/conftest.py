"""Shared fixtures.

Prefect reads PREFECT_HOME and its other settings when first imported, so they are set here, at
conftest import time, before any test module imports prefect: tests never touch ~/.prefect and
never send analytics.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="regdpo-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# A user's own server must not receive test runs; the harness points the client at its own.
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's temporary local server (SQLite), started once per session (~15-25 s) and shared.

    Not autouse: only tests that run flows against a server ask for it.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Heartbeats detect crashed deployment runs; in tests each flow run would only wait up to
    # 1 s at exit for the heartbeat thread to stop.
    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


TINY_CONFIG = """\
workdir: ./run
model: {preset: tiny, max_sequence_length: 16}
video: {fps: 8, num_frames: 9, height: 32, width: 32}
ingest: {manifest: ./manifest.csv}
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """A valid tiny config in tmp_path (workdir tmp_path/run) and a two-row manifest.csv beside it
    (the videos need not exist: fake stages read only the rows)."""
    p = tmp_path / "config.yaml"
    p.write_text(TINY_CONFIG)
    (tmp_path / "manifest.csv").write_text("path,caption\na.mp4,a cat\nb.mp4,a dog\n")
    return p


@pytest.fixture
def fake_builders(monkeypatch) -> list[str]:
    """Replace every stage with a fake without torch (tests/fakes.py); returns the stages that
    ran (published), in order. Unit stages are real unit stages over text lines; whole stages
    check their inputs are published, write `<stage>.txt`, and evaluate writes report.md."""
    import regdpo.stages
    from regdpo.stages.registry import get_stage
    from tests.fakes import fake_impl

    calls: list[str] = []
    impls: dict[str, object] = {}

    def get_impl(name: str):
        get_stage(name)
        if name not in impls:
            impls[name] = fake_impl(name, calls)
        return impls[name]

    monkeypatch.setattr(regdpo.stages, "get_impl", get_impl)
    return calls


@pytest.fixture(scope="session")
def encoded_workdir(tmp_path_factory) -> Path:
    """A folder with config.yaml and its workdir run/ where ingest, generate and encode are done
    (two real clips, tiny model), built once per session; tests that train in it copy it. Training
    there never ends on its own (max_steps 1000, a checkpoint every 2 steps): tests interrupt it."""
    from regdpo.config import load_config
    from regdpo.stages import run
    from tests.pipeline_helpers import small_config

    root = tmp_path_factory.mktemp("encoded")
    path = small_config(root, train={"max_steps": 1000, "checkpoint_every": 2, "batch_size": 2, "loader_workers": 0})
    cfg = load_config(path)
    for stage in ("ingest", "generate", "encode"):
        run(cfg, stage)
    return root
