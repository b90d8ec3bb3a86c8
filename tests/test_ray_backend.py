"""--backend ray: one Ray task per search; the same results as the local backend, and a search
whose worker dies is resumed from its last completed episode."""

from __future__ import annotations

import csv
import json

import pytest

ray = pytest.importorskip("ray")

from arq_gym.experiments.benchmark import benchmark  # noqa: E402
from arq_gym.experiments.parallel import run_searches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DYING_AGENT = '''
import os
from pathlib import Path

from arq_gym.agents.random_search import RandomSearch


class DiesOnce(RandomSearch):
    """Random search whose worker process dies in episode 3 the first time (a lost node)."""

    name = "dies-once"

    def end_episode(self, reward, info):
        super().end_episode(reward, info)
        marker = Path(os.environ["ARQ_TEST_MARKER"])
        if self.episodes_done == 3 and not marker.exists():
            marker.write_text("died")
            os._exit(1)
'''


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    marker = tmp_path_factory.mktemp("ray") / "died"
    import os

    os.environ["ARQ_TEST_MARKER"] = str(marker)  # inherited by the local cluster's workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield marker
    ray.shutdown()


def _rewards(run_dir):
    with open(run_dir / "episodes.csv") as f:
        return [(int(r["episode"]), r["reward"]) for r in csv.DictReader(f)]


def test_ray_benchmark_equals_local(ray_cluster, tmp_path, data_dir):
    kw = {"fidelity": "smoke", "device": "cpu", "data_dir": str(data_dir)}
    args = ("ARQ-LeNet5-v0", ["random", "arq-ddpg"], 1, 3)
    common = dict(env_kwargs=kw, agent_kwargs=["arq-ddpg:warmup_episodes=1"], final_eval=False,
                  progress=False)  # fmt: skip
    local = benchmark(*args, tmp_path / "local", **common)
    remote = benchmark(*args, tmp_path / "ray", backend="ray", **common)
    assert [r["best_reward"] for r in remote["runs"]] == [r["best_reward"] for r in local["runs"]]
    for run in ("random-s0", "arq-ddpg-s0"):
        assert _rewards(tmp_path / "ray" / "runs" / run) == _rewards(tmp_path / "local" / "runs" / run)


def test_a_dead_worker_is_resumed_without_duplicates(ray_cluster, tmp_path, data_dir):
    agent_file = tmp_path / "dying_agent.py"
    agent_file.write_text(DYING_AGENT)
    kw = {"fidelity": "smoke", "device": "cpu", "data_dir": str(data_dir)}
    job = {"run": "dies", "search": dict(
        env_id="ARQ-LeNet5-v0", agent=f"{agent_file}:DiesOnce", episodes=6, seed=0,
        out=str(tmp_path / "run"), env_kwargs=kw, resume=True, final_eval=False,
        progress=False)}  # fmt: skip
    results, errors = run_searches([job], backend="ray", progress=False)
    assert not errors and ray_cluster.read_text() == "died"  # it did die once
    assert results["dies"]["episodes"] == 6
    episodes = [e for e, _ in _rewards(tmp_path / "run")]
    assert episodes == [1, 2, 3, 4, 5, 6]  # each once, none lost
    state = json.loads((tmp_path / "run" / "search.json").read_text())
    assert state["episodes"] == 6
