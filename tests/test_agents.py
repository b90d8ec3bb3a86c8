"""Agents: the registry, the interface, the paper's DDPG, random search and the SB3 runners.

Run on a tiny deterministic env with the arq-gym contract (tests/toy_env.py) so that they are
fast; the search tests run the agents on the real env.
"""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import toy_env
from gymnasium import spaces

from arq_gym import agents
from arq_gym.agents.arq_ddpg import ARQDDPG, DDPGConfig
from arq_gym.agents.base import Agent, episode_length
from arq_gym.agents.random_search import RandomSearch

RANDOM_MEAN = 1.0 - (1 / 3 + float(np.mean(toy_env.TARGETS**2)))  # expected reward of random


def toy(**kw) -> gym.Env:
    return gym.make(toy_env.register(), **kw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class DuckAgent:
    """A user's agent that knows nothing of arq_gym.agents.Agent (duck typing)."""

    def __init__(self, env, seed=0, step=0.1):
        self.env, self.rng, self.step, self.count = env, np.random.default_rng(seed), step, 0

    def run_episode(self):
        self.env.reset()
        while True:
            _, r, term, trunc, info = self.env.step(self.rng.uniform(-1, 1, (1,)))
            if term or trunc:
                self.count += 1
                return r, info


class NotAnAgent:
    pass


# ---------------------------------------------------------------------- registry


def test_get_builtins_and_available():
    assert agents.available() == list(agents.BUILTIN)
    assert agents.get("arq-ddpg") is ARQDDPG
    assert agents.get("random") is RandomSearch
    for name in agents.available():
        assert issubclass(agents.get(name), Agent)
    assert agents.get("arq_gym.agents.random_search:RandomSearch") is RandomSearch


@pytest.mark.parametrize(
    "name, match",
    [
        ("no-such-agent", "unknown agent 'no-such-agent'; built-ins: arq-ddpg"),
        ("no_such_module_xyz:Agent", "cannot import module 'no_such_module_xyz'"),
        ("arq_gym.agents.random_search:Nope", "has no attribute 'Nope'"),
        ("arq_gym.agents.random_search:__all__", "is not a class"),
        ("test_agents:NotAnAgent", "neither the Agent interface"),
        ("missing/file.py:Agent", "does not exist"),
        (":Agent", "import path must look like"),
        ("", "non-empty string"),
    ],
)
def test_get_bad_names_are_one_line_value_errors(name, match):
    with pytest.raises(ValueError, match=match) as err:
        agents.get(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["arq-ddpg", "sb3-ddpg", "sb3-td3", "sb3-sac"])
def test_box_agent_on_discrete_env_is_refused(name):
    with pytest.raises(ValueError, match=r"needs Box actions but the env has Discrete\(7\)"):
        agents.make(name, toy(action_type="discrete"))


def test_discrete_agent_on_box_env_is_refused():
    with pytest.raises(ValueError, match="needs Discrete actions .*action_type=discrete"):
        agents.make("sb3-dqn", toy())


def test_unknown_hyperparameter_is_refused():
    with pytest.raises(ValueError, match="unknown hyperparameter.*warmup"):
        agents.make("random", toy(), warmup=3)
    with pytest.raises(ValueError, match="unknown hyperparameter.*bogus"):
        agents.make("arq-ddpg", toy(), bogus=1)
    with pytest.raises(ValueError, match="sb3-ppo"):
        agents.make("sb3-ppo", toy(), bogus=1)


def test_file_path_agent_and_duck_typing(tmp_path):
    src = tmp_path / "my_agent.py"
    src.write_text(
        "import numpy as np\n"
        "class Zero:\n"
        "    def __init__(self, env, seed=0):\n"
        "        self.env = env\n"
        "        self.n = 0\n"
        "    def run_episode(self):\n"
        "        self.env.reset()\n"
        "        while True:\n"
        "            _, r, t, tr, info = self.env.step(np.zeros(1, np.float32))\n"
        "            if t or tr:\n"
        "                self.n += 1\n"
        "                return r, info\n"
    )
    agent = agents.make(f"{src}:Zero", toy(), seed=1)
    assert isinstance(agent, agents.ExternalAgent)
    reward, info = agent.run_episode()
    assert reward == pytest.approx(1 - np.mean(toy_env.TARGETS**2))
    assert info["w_bits"] == [5] * 5
    state = pickle.loads(pickle.dumps(agent.state_dict()))
    assert state["inner"]["n"] == 1 and state["episodes_done"] == 1


def test_duck_agent_state_round_trip():
    a = agents.make("test_agents:DuckAgent", toy(), seed=3, step=0.5)
    for _ in range(3):
        a.run_episode()
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = agents.make("test_agents:DuckAgent", toy(), seed=3, step=0.5)
    b.load_state_dict(state)
    assert b.inner.count == 3
    assert [a.run_episode()[0] for _ in range(2)] == [b.run_episode()[0] for _ in range(2)]


def test_episode_length_reads_num_layers():
    assert episode_length(toy()) == 5


# ---------------------------------------------------------------------- random search


def test_random_search_box_and_discrete():
    a = agents.make("random", toy(), seed=0)
    acts = np.array([a.act(None) for _ in range(2000)])
    assert acts.shape == (2000, 1) and acts.dtype == np.float32
    assert acts.min() >= -1 and acts.max() <= 1 and abs(acts.mean()) < 0.05
    d = agents.make("random", toy(action_type="discrete"), seed=0)
    counts = np.bincount([d.act(None) for _ in range(7000)], minlength=7)
    assert counts.min() > 800
    rewards = [a.run_episode()[0] for _ in range(300)]
    assert np.mean(rewards) == pytest.approx(RANDOM_MEAN, abs=0.05)


def test_random_search_same_seed_same_episodes():
    r1 = [agents.make("random", toy(), seed=5).run_episode()[0] for _ in range(1)]
    a, b = agents.make("random", toy(), seed=5), agents.make("random", toy(), seed=5)
    ra = [a.run_episode()[0] for _ in range(5)]
    rb = [b.run_episode()[0] for _ in range(5)]
    assert ra == rb and ra[0] == r1[0]
    c = agents.make("random", toy(), seed=6)
    assert [c.run_episode()[0] for _ in range(5)] != ra


# ---------------------------------------------------------------------- arq-ddpg


def test_ddpg_config_defaults_are_haq():
    c = DDPGConfig()
    assert (c.hidden, c.actor_lr, c.critic_lr, c.tau, c.discount, c.batch_size) == (
        300, 1e-4, 1e-3, 0.01, 1.0, 64)  # fmt: skip
    assert (c.buffer_per_layer, c.warmup_episodes, c.noise_std, c.noise_decay) == (
        128, 20, 1.0, 0.99)  # fmt: skip
    assert c.baseline_alpha == 0.5 and c.updates_per_episode is None
    with pytest.raises(ValueError, match="batch_size"):
        DDPGConfig(batch_size=0)


def test_ddpg_networks_buffer_and_warmup():
    env = toy()
    a = agents.make("arq-ddpg", env, seed=0, warmup_episodes=3)
    assert [m.out_features for m in a.actor.net if hasattr(m, "out_features")] == [300, 300, 1]
    assert a.buffer.capacity == 128 * 5
    before = [p.clone() for p in a.actor.parameters()]
    for _ in range(3):  # warm-up: random actions, no learning
        a.run_episode()
    assert all((p == q).all() for p, q in zip(before, a.actor.parameters()))
    assert a.buffer.size == 15
    # every transition of an episode carries the episode's final reward
    rew = a.buffer.rew[:15].reshape(3, 5)
    assert (rew == rew[:, -1:]).all() and len(set(rew[:, 0])) == 3
    assert a.buffer.done[:15].reshape(3, 5)[:, -1].tolist() == [1, 1, 1]
    a.run_episode()  # first learning episode: 5 updates
    assert any((p != q).any() for p, q in zip(before, a.actor.parameters()))
    assert a.baseline is not None and np.isfinite(a.last_losses).all()


def test_ddpg_exploration_is_truncated_normal_decaying():
    a = agents.make("arq-ddpg", toy(), seed=0, warmup_episodes=2)
    assert a.exploration_std() == 1.0
    a.episodes_done = 12
    assert a.exploration_std() == pytest.approx(0.99**10)
    obs = np.zeros(2, np.float32)
    greedy = a.act(obs, explore=False)
    assert greedy == a.act(obs, explore=False)
    acts = np.array([a.act(obs) for _ in range(3000)]).ravel()
    assert acts.min() >= -1 and acts.max() <= 1
    assert 0.4 < acts.std() < 0.75  # a N(mu, 0.9) truncated to [-1, 1]
    assert abs(np.median(acts) - float(greedy[0])) < 0.1


def test_ddpg_learns_the_toy_problem():
    a = agents.make("arq-ddpg", toy(), seed=0, warmup_episodes=5)
    for _ in range(60):
        a.run_episode()
    greedy = a.run_episode(explore=False)[0]
    assert greedy > RANDOM_MEAN + 0.2


@pytest.mark.parametrize("name, kw", [("arq-ddpg", {"warmup_episodes": 2}), ("random", {})])
def test_state_dict_resumes_exactly(name, kw):
    a = agents.make(name, toy(), seed=4, **kw)
    for _ in range(6):
        a.run_episode()
    state = pickle.loads(pickle.dumps(a.state_dict()))
    cont = [a.run_episode()[0] for _ in range(4)]
    b = agents.make(name, toy(), seed=4, **kw)
    b.load_state_dict(state)
    assert [b.run_episode()[0] for _ in range(4)] == cont


def test_run_calls_record_then_checkpoint():
    a = agents.make("random", toy(), seed=0)
    log = []
    a.run(3, lambda r, info: log.append(("record", round(r, 6))), lambda: log.append("ckpt"))
    assert [x if x == "ckpt" else x[0] for x in log] == ["record", "ckpt"] * 3
    assert a.episodes_done == 3


# ---------------------------------------------------------------------- SB3


@pytest.mark.parametrize("name", ["sb3-ddpg", "sb3-td3", "sb3-sac", "sb3-ppo", "sb3-a2c"])
def test_sb3_agents_run_exact_episode_counts_and_resume(name):
    env = toy()
    a = agents.make(name, env, seed=0, learning_starts=10) if name in (
        "sb3-ddpg", "sb3-td3", "sb3-sac") else agents.make(name, env, seed=0)  # fmt: skip
    rewards, ckpts = [], []
    a.run(9, lambda r, info: rewards.append((r, info)), lambda: ckpts.append(len(rewards)))
    assert len(rewards) == 9 and a.episodes_done == 9
    assert all(set(info) >= {"w_bits", "acr"} and "terminal_observation" not in info
               for _, info in rewards)  # fmt: skip
    assert ckpts[-1] == 9 and ckpts == sorted(ckpts)
    if name in ("sb3-ddpg", "sb3-td3", "sb3-sac"):
        assert ckpts == list(range(1, 10))  # one learn call per episode
        assert a.model.replay_buffer.size() == 45
    if name == "sb3-ppo":
        assert a.model.n_steps == 20 and ckpts == [4, 8, 9]
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = agents.make(name, toy(), seed=0)
    b.load_state_dict(state)
    assert b.episodes_done == 9 and b.model.num_timesteps == a.model.num_timesteps
    if "replay_buffer" in state:
        assert b.model.replay_buffer.size() == 45
    more = []
    b.run(2, lambda r, info: more.append(r))
    assert len(more) == 2 and b.episodes_done == 11


def test_sb3_agents_leave_no_temporary_folders(tmp_path, monkeypatch):
    # SB3 names a fresh temporary log folder on each learn() call unless given a logger
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = agents.make("sb3-td3", toy(), seed=0, learning_starts=10)
    a.run(3, lambda r, info: None)
    b = agents.make("sb3-td3", toy(), seed=0)
    b.load_state_dict(a.state_dict())
    b.run(1, lambda r, info: None)
    assert b.episodes_done == 4 and list(tmp_path.iterdir()) == []


def test_sb3_dqn_on_discrete_env():
    a = agents.make("sb3-dqn", toy(action_type="discrete"), seed=0)
    assert a.model.gamma == 1.0 and a.model.learning_starts == 25
    got = []
    a.run(7, lambda r, info: got.append(r))
    assert len(got) == 7 and a.model.num_timesteps == 35
    assert a.model.exploration_rate < 1.0  # the schedule spans the whole search


def test_sb3_defaults_documented_values():
    from arq_gym.agents.sb3 import defaults

    env = toy()
    ppo = defaults("ppo", env)
    assert ppo["n_steps"] == 20 and ppo["batch_size"] == 5 and ppo["gamma"] == 1.0
    assert defaults("a2c", env)["n_steps"] == 5
    ddpg = defaults("ddpg", env)
    assert ddpg["train_freq"] == (1, "episode") and ddpg["buffer_size"] == 640
    assert isinstance(toy().action_space, spaces.Box)
