"""The ARQ environment: choose a bit-width per layer, get the certified robustness as reward."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from arq_gym.policy import Policy
from arq_gym.problem import REWARDS, Evaluation, QuantizationProblem, make_problem

__all__ = [
    "ACTION_TYPES",
    "BITS_MODES",
    "OBSERVATION_FEATURES",
    "RENDER_MODES",
    "ARQEnv",
    "bits_from_action",
    "pair_from_discrete",
]

ACTION_TYPES = ("continuous", "discrete")
#: "wa": one step sets a layer's weight and activation bits separately; "tied": one bit-width
BITS_MODES = ("wa", "tied")
#: render modes ARQEnv draws itself (gym.make adds "rgb_array_list" and "human" on top of them)
RENDER_MODES = ("ansi", "rgb_array")
#: size in pixels (height, width) of the ``render_mode="rgb_array"`` image
RENDER_SIZE = (400, 640)
#: names of the observation features, in order (see the ARQEnv docstring)
OBSERVATION_FEATURES = (
    "layer_index",
    "c_in",
    "c_out",
    "kernel",
    "stride",
    "feature_map",
    "weights",
    "depthwise",
    "mac_share",
    "previous_w_bits",
    "previous_a_bits",
    "budget_spent",
    "budget_needed",
)


def bits_from_action(action: float, bits: Sequence[int]) -> int:
    """HAQ's mapping of a continuous action in [-1, 1] to a bit-width in ``[min, max]``.

    ``u = (a + 1) / 2`` in [0, 1], ``bits = round(min - 0.5 + u * (max - min + 1))`` with ties
    rounded up, clipped to ``[min, max]``: the interval is cut into ``max - min + 1``
    equal-width bins, one per bit-width. Out-of-range actions are clipped first.
    """
    lo, hi = int(bits[0]), int(bits[1])
    u = (min(max(float(action), -1.0), 1.0) + 1.0) / 2.0
    return int(min(max(math.floor(lo + u * (hi - lo + 1)), lo), hi))


def pair_from_discrete(k: int, bits: Sequence[int]) -> tuple[int, int]:
    """``(w_bits, a_bits)`` of discrete action ``k`` with ``bits_mode="wa"``: with
    ``K = max - min + 1`` bit-widths, ``w = min + k // K`` and ``a = min + k % K`` (row-major:
    ``k = (w - min) * K + (a - min)``)."""
    lo, hi = int(bits[0]), int(bits[1])
    width = hi - lo + 1
    return lo + int(k) // width, lo + int(k) % width


def _minmax(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


class ARQEnv(gym.Env):
    """Mixed-precision quantization of a smoothed classifier, one layer per step.

    ## Description

    An episode walks the quantizable layers (convolutions and linear layers, in forward order)
    of a base network trained for randomized smoothing. At each step the agent picks the
    bit-widths of one layer's weights and of its input activations (``bits_mode="wa"``, the
    paper's choice and the default), or one bit-width for both (``bits_mode="tied"``). After
    the last layer the requested policy is made to fit a budget of bit operations (BOPs,
    ``sum_l MACs_l * w_bits_l * a_bits_l``, as a fraction of the FP32 network's), the network is
    fake-quantized to it, and the smoothed quantized classifier is certified incrementally
    (IRS: the FP32 network's certification on the evaluation images is cached once, each
    candidate costs ``n_p`` noisy samples per image). The reward is the certified robustness of
    that classifier (ARQ), by default its average certified radius (ACR).

    The environment is a thin wrapper of a :class:`~arq_gym.problem.QuantizationProblem`
    (``env.unwrapped.problem``), which non-RL searchers can use directly; environments made
    with the same arguments in one process share one problem and its evaluation cache.

    ## Action Space

    ``action_type="continuous"`` (default): ``Box(-1, 1, (2,), float32)`` with
    ``bits_mode="wa"`` (weight bits, activation bits) or ``Box(-1, 1, (1,), float32)`` with
    ``bits_mode="tied"``; each entry is mapped HAQ-style to a bit-width in ``bits = (min,
    max)``: ``u = (a + 1) / 2``, ``b = round(min - 0.5 + u * (max - min + 1))`` (equal-width
    bins, ties up), clipped. ``action_type="discrete"``: with ``bits_mode="tied"``
    ``Discrete(K)``, ``K = max - min + 1``, action ``k`` means ``min + k`` bits; with
    ``bits_mode="wa"`` one ``Discrete(K * K)`` over all pairs (what SB3's DQN accepts), action
    ``k`` means weight bits ``min + k // K`` and activation bits ``min + k % K``
    (:func:`pair_from_discrete`; for bits (2, 8), ``k = 7 * (w - 2) + (a - 2)``). Finite
    out-of-range
    continuous actions are clipped into [-1, 1] (agents' exploration noise routinely leaves the
    box); a discrete action outside ``0 .. max - min`` (such as 99 or -1), NaN, inf, a wrong
    shape or a non-integer discrete action raise a one-line ValueError, as Gymnasium's contract
    makes an action outside the action space an error. The first and last layers are pinned at
    ``keep_first_last`` bits unless it is None; their steps still happen and their actions are
    ignored.

    ## Observation Space

    ``Box(0, 1, (13,), float32)``, the HAQ layer features of the layer about to be quantized,
    each min-max normalised over the model's layers (0 when constant), and two budget features:

    | #  | name          | meaning                                                          |
    |----|---------------|------------------------------------------------------------------|
    | 0  | layer_index   | index of the layer / (number of layers - 1)                      |
    | 1  | c_in          | input channels (linear: input features)                          |
    | 2  | c_out         | output channels (linear: output features)                        |
    | 3  | kernel        | kernel area kh * kw (linear: 1)                                  |
    | 4  | stride        | stride (linear: 1)                                               |
    | 5  | feature_map   | input feature-map area h * w (linear: 1)                         |
    | 6  | weights       | number of weights                                                |
    | 7  | depthwise     | 1 for a depthwise convolution, else 0 (not normalised)           |
    | 8  | mac_share     | the layer's MACs / the model's MACs (not normalised)             |
    | 9  | previous_w_bits | weight bits given to the previous layer, (b - min) /           |
    |    |               | (max - min), clipped to [0, 1]; 1 at the first layer             |
    | 10 | previous_a_bits | activation bits given to the previous layer, likewise          |
    |    |               | (equal to previous_w_bits with ``bits_mode="tied"``)             |
    | 11 | budget_spent  | BOPs of the layers chosen so far / the budget, clipped to [0, 1] |
    | 12 | budget_needed | BOPs of this and the remaining layers at their minimum bits /    |
    |    |               | the budget left, clipped to [0, 1] (1 when nothing is left)      |

    "Chosen so far" counts the bits a layer actually gets during the episode: its pinned bits,
    else the requested bits, in ``budget_mode="clip"`` after clipping. The observation returned
    with the terminal step describes the last layer with the budget features after it
    (``budget_needed`` = 0).

    ## Rewards

    0.0 on every step but the last; on the last step, as a Python float, the named ``reward``
    of the certificate of the budget-enforced policy:

    - ``"acr"`` (default, ARQ's objective): average certified radius, 0 for wrong or abstained
      images;
    - ``"certified_accuracy"``: fraction of images correct and certified at ``reward_radius``;
    - ``"clean_accuracy"``: accuracy of the smoothed classifier (radius 0), the HAQ-style
      baseline;
    - ``"acr_delta"``: ACR minus the FP32 network's ACR on the same images.

    The reward of a policy is a deterministic function of the policy, the base model, the
    evaluation subset, the fidelity and ``noise_seed``.

    ## Starting State

    The first layer, nothing chosen yet. The environment has no randomness of its own;
    ``reset(seed=...)`` seeds ``env.np_random`` only.

    ## Episode End

    ``terminated=True`` after one step per quantizable layer (20 for ResNet-20, 5 for LeNet-5).
    The environment never truncates (``truncated`` is always False). Stepping after the end
    or before ``reset`` raises RuntimeError.

    The terminal ``info`` holds: ``w_bits``, ``a_bits`` (the enforced policy, lists),
    ``requested_bits`` (what the actions asked for: one bit-width per layer with
    ``bits_mode="tied"``, a ``[w_bits, a_bits]`` pair per layer with ``"wa"``), ``bops``, ``bops_fraction``, ``budget``,
    ``acr``, ``certified_accuracy`` (radius as a string such as ``"0.25"`` -> fraction),
    ``clean_accuracy``, ``abstain_rate``, ``fp_acr``, ``reward_name``, ``eval_seconds`` and
    ``cache_hit``. Other steps' info holds ``layer`` (name), ``bits`` and ``requested_bits`` (an
    int, or a ``(w_bits, a_bits)`` pair with ``bits_mode="wa"``).

    ## Arguments

    ```python
    import gymnasium as gym
    import arq_gym

    env = gym.make("ARQ-ResNet20-v0", sigma=0.25, budget=1 / 64, reward="acr",
                   fidelity="search", render_mode="ansi")
    ```

    - ``sigma``: noise level; 0.25, 0.5 and 1.0 have shipped models (default 0.25, or the
      sigma a ``checkpoint`` was trained with).
    - ``budget``: BOPs budget as a fraction of the FP32 BOPs (default 1/64, uniform W4A4).
    - ``reward``: one of ``"acr"``, ``"certified_accuracy"``, ``"clean_accuracy"``,
      ``"acr_delta"``; ``reward_radius`` (default 0.25) for ``"certified_accuracy"``.
    - ``bits``: ``(min, max)`` bit-widths, default ``(2, 8)``.
    - ``keep_first_last``: bits of the first and last layers (default 8; None for
      ARQ-LeNet5-v0) or None to search them too.
    - ``budget_mode``: ``"haq"`` (default; after the episode lower activation then weight bits
      from the last layer to the first until the policy fits) or ``"clip"`` (each step gets at
      most the bits that keep the remaining layers feasible at minimum bits; with separate
      bits the larger of the two is lowered first).
    - ``action_type``: ``"continuous"`` (default) or ``"discrete"``.
    - ``bits_mode``: ``"wa"`` (default; separate weight and activation bits per step) or
      ``"tied"`` (one bit-width per layer for both, the v0 behaviour before wave 2).
    - ``fidelity``: ``"smoke"`` (16 validation images, n = 1,000, n_p = 100), ``"search"``
      (default; 100 validation images, n = 10,000, n_p = 500) or ``"paper"`` (500 test images,
      n = 100,000, n_p = 10,000); explicit overrides ``images``, ``n``, ``n_p``, ``alpha``.
    - ``device``: ``"auto"`` (default; CUDA when available), ``"cpu"`` or ``"cuda"``.
    - ``backend``: how the quantized network runs: ``"auto"`` (default; int8 integer
      convolutions under torch.compile on a CPU that has them, else float32 fake
      quantization), ``"int8-compiled"``, ``"int8"`` or ``"reference"`` (see
      :class:`~arq_gym.problem.QuantizationProblem`). Except with ``"reference"``, an IRS cache
      the env has to build certifies the FP32 network under torch.compile on a CPU
      (:mod:`arq_gym.models.compiled`).
    - ``data_dir``: where the dataset is (default: ``$ARQ_GYM_DATA``, then the user cache).
    - ``cache_dir``: folder for the certification cache of the FP32 network and a persistent
      evaluation cache shared by processes (default: the user cache, evaluations in memory).
    - ``checkpoint``: path of your own base model (see :func:`arq_gym.models.save_checkpoint`).
    - ``render_mode``: None, ``"ansi"`` or ``"rgb_array"`` (see Rendering).
    - ``noise_seed``: seed of the certification noise (default 0).
    - ``model``, ``dataset``: the shipped base model (fixed by the id), or with
      ``ARQ-Custom-v0`` your own ``model`` (an ``nn.Module`` or ``"package.module:factory"``)
      with ``data`` (an ``(images, labels)`` pair, a torch Dataset or a ``{"train", "val",
      "test"}`` mapping) and ``sigma`` (:mod:`arq_gym.custom`).
    - ``problem``: a prebuilt :class:`~arq_gym.problem.QuantizationProblem` (then the problem
      arguments above are ignored).

    Errors are one-line exceptions: an unknown reward or option raises ValueError, an
    infeasible budget or one above 1 (more than the FP32 network costs)
    :class:`~arq_gym.budget.BudgetError`, a sigma without a shipped model and no checkpoint
    :class:`~arq_gym.models.ZooError` naming the shipped sigmas. A budget at or above the cost
    of the largest allowed policy (every searched layer at the maximum bits, pinned layers at
    their bits; 1/16 for ResNet-20 with the default ``bits``) constrains nothing: it is
    accepted with a :class:`~arq_gym.budget.BudgetWarning`, once per budget setting.

    ## Rendering

    - ``"ansi"``: ``render()`` returns a text table of the layers so far (MACs share, requested,
      weight and activation bits, BOPs share) and the BOPs spent against the budget; after the
      last step the enforced policy and the certificate's figures.
    - ``"rgb_array"``: ``render()`` returns an RGB image, a ``uint8`` array of shape
      ``(400, 640, 3)``: the weight and activation bits of each layer chosen so far (enforced
      after the last step; hatched bars are pinned layers, black ticks the requested bits) and
      a bar of the BOPs spent, as a share of the FP32 network's, against the budget (with the
      cost of the remaining layers at their minimum bits while the episode runs). Drawn with
      matplotlib's Agg backend into a reused figure, about 0.1 s per frame on a 2-core CPU.
      This is what Stable-Baselines3's ``make_vec_env`` asks for, and ``gym.make`` builds
      ``"rgb_array_list"`` and ``"human"`` (with pygame) on it.
    - Any other mode: Gymnasium's convention, a warning when the environment is made and
      ``render()`` returns None.

    ## Vector Environments

    Stable-Baselines3's ``make_vec_env("ARQ-ResNet20-v0", n_envs=..., env_kwargs=...)`` works
    with ``DummyVecEnv`` and ``SubprocVecEnv`` (it asks for ``render_mode="rgb_array"``). Its
    ``SubprocVecEnv`` workers start by forkserver or spawn, so they know the ids when the main
    script imports ``arq_gym`` at top level (with the usual ``if __name__ == "__main__":``
    guard); otherwise name the module in the id, ``"arq_gym:ARQ-ResNet20-v0"``.

    ## Version History

    - v0: initial release (one step per layer, same bits for weights and input activations,
      12 observation features, IRS-based reward). Wave 2, same id: ``bits_mode`` with separate
      weight and activation bits as the default (2-dimensional continuous actions, a
      ``Discrete(K * K)`` of pairs), 13 observation features (previous weight and activation
      bits); ``bits_mode="tied"`` keeps the old action space.
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 4}

    def __init__(
        self,
        model: Any = "resnet20",
        dataset: str | None = None,
        sigma: float | None = None,
        budget: float = 1 / 64,
        reward: str = "acr",
        reward_radius: float = 0.25,
        bits: Sequence[int] = (2, 8),
        keep_first_last: int | None = 8,
        budget_mode: str = "haq",
        action_type: str = "continuous",
        bits_mode: str = "wa",
        fidelity: str = "search",
        images: int | None = None,
        n: int | None = None,
        n_p: int | None = None,
        alpha: float | None = None,
        device: str = "auto",
        backend: str = "auto",
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        render_mode: str | None = None,
        noise_seed: int = 0,
        problem: QuantizationProblem | None = None,
        data: Any = None,
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
        if action_type not in ACTION_TYPES:
            raise ValueError(
                f"unknown action_type {action_type!r}; choose one of {', '.join(ACTION_TYPES)}"
            )
        if bits_mode not in BITS_MODES:
            raise ValueError(
                f"unknown bits_mode {bits_mode!r}; choose one of {', '.join(BITS_MODES)}"
            )
        if render_mode is not None and render_mode not in RENDER_MODES:
            gym.logger.warn(
                f"ARQEnv does not support render_mode={render_mode!r} (supported: None, "
                f"{', '.join(repr(m) for m in RENDER_MODES)}); render() will return None"
            )
        if (
            isinstance(reward_radius, bool) or not isinstance(reward_radius, (int, float))
            or not math.isfinite(reward_radius) or reward_radius < 0
        ):  # fmt: skip
            raise ValueError(f"reward_radius must be a finite number >= 0, got {reward_radius!r}")
        if problem is None:
            problem = make_problem(
                model=model, dataset=dataset, sigma=sigma, checkpoint=checkpoint, budget=budget,
                bits=bits, keep_first_last=keep_first_last, budget_mode=budget_mode,
                fidelity=fidelity, images=images, n=n, n_p=n_p, alpha=alpha, device=device,
                data_dir=data_dir, cache_dir=cache_dir, seed=noise_seed, backend=backend,
                data=data,
            )  # fmt: skip
        elif not isinstance(problem, QuantizationProblem):
            raise ValueError(f"problem must be a QuantizationProblem, got {type(problem).__name__}")
        self.problem = problem
        self.reward_name = reward
        self.reward_radius = float(reward_radius)
        self.action_type = action_type
        self.bits_mode = bits_mode
        self.render_mode = render_mode
        self.bits = problem.bits
        self.num_layers = problem.num_layers

        lo, hi = self.bits
        per_step = 2 if bits_mode == "wa" else 1
        if action_type == "continuous":
            self.action_space = spaces.Box(-1.0, 1.0, (per_step,), dtype=np.float32)
        else:
            self.action_space = spaces.Discrete((hi - lo + 1) ** per_step)
        self.observation_space = spaces.Box(
            0.0, 1.0, (len(OBSERVATION_FEATURES),), dtype=np.float32
        )
        self._layer_features = self._static_features()
        self._step = -1  # -1: not reset
        self._done = False
        # per layer so far: requested and chosen (w_bits, a_bits)
        self._requested: list[tuple[int, int]] = []
        self._chosen: list[tuple[int, int]] = []
        self._spent = 0
        self.last_evaluation: Evaluation | None = None
        self._figure = None  # matplotlib figure reused by render_mode="rgb_array"

    # ------------------------------------------------------------------ features

    def _static_features(self) -> np.ndarray:
        layers = self.problem.layers
        num = len(layers)
        total_macs = sum(layer.macs for layer in layers) or 1
        cols = [
            np.arange(num) / max(num - 1, 1),
            _minmax([layer.c_in for layer in layers]),
            _minmax([layer.c_out for layer in layers]),
            _minmax([layer.kernel[0] * layer.kernel[1] for layer in layers]),
            _minmax([layer.stride[0] for layer in layers]),
            _minmax([layer.in_h * layer.in_w for layer in layers]),
            _minmax([layer.weights for layer in layers]),
            np.array([float(layer.depthwise) for layer in layers]),
            np.array([layer.macs / total_macs for layer in layers]),
        ]
        return np.stack(cols, axis=1)

    def _observation(self) -> np.ndarray:
        lo, hi = self.bits
        index = min(self._step, self.num_layers - 1)
        if self._chosen and hi > lo:
            prev = [(b - lo) / (hi - lo) for b in self._chosen[-1]]
        else:
            prev = [1.0, 1.0]
        budget = float(self.problem.budget_bops)
        spent = self._spent / budget
        left = budget - self._spent
        if self._step >= self.num_layers:
            needed = 0.0
        else:
            needed = self.problem.min_bops_from(self._step) / left if left > 0 else 1.0
        obs = np.concatenate([self._layer_features[index], [*prev, spent, needed]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------ actions

    def _requested_bits(self, action: Any) -> tuple[int, int]:
        """``(w_bits, a_bits)`` an action asks for (equal with ``bits_mode="tied"``)."""
        try:
            arr = np.asarray(action)
            if arr.dtype == object:
                raise TypeError
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"action must be a number, got {action!r}") from None
        lo, hi = self.bits
        if self.action_type == "continuous":
            shape = self.action_space.shape
            shapes = (shape, ()) if shape == (1,) else (shape,)
            if arr.shape not in shapes:
                raise ValueError(f"action must have shape {shape}, got shape {arr.shape}")
            values = arr.reshape(-1)
            if not np.all(np.isfinite(values)):
                shown = values[0] if values.size == 1 else values.tolist()
                raise ValueError(f"action must be finite, got {shown}")
            bits = [bits_from_action(float(v), self.bits) for v in values]
            return (bits[0], bits[-1])
        if arr.shape not in ((1,), ()):
            raise ValueError(f"action must have shape () or (1,), got shape {arr.shape}")
        value = float(arr.reshape(-1)[0])
        if not math.isfinite(value):
            raise ValueError(f"action must be finite, got {value}")
        if value != round(value):
            raise ValueError(f"discrete action must be an integer, got {value}")
        k = int(round(value))
        if not 0 <= k < self.action_space.n:
            meaning = (f"{lo} .. {hi} bits" if self.bits_mode == "tied"
                       else f"(weight, activation) bit pairs, k = {hi - lo + 1} * (w - {lo}) "
                            f"+ (a - {lo})")  # fmt: skip
            raise ValueError(
                f"discrete action {k} is outside the action space {self.action_space} "
                f"(0 .. {self.action_space.n - 1} = {meaning})"
            )
        if self.bits_mode == "tied":
            return (lo + k, lo + k)
        return pair_from_discrete(k, self.bits)

    # ------------------------------------------------------------------ Gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode at the first layer; returns ``(observation, info)``."""
        super().reset(seed=seed)
        self._step = 0
        self._done = False
        self._requested = []
        self._chosen = []
        self._spent = 0
        self.last_evaluation = None
        return self._observation(), {"layer": self.problem.layers[0].name,
                                     "num_layers": self.num_layers}  # fmt: skip

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Choose the bits of the current layer; the last step returns the reward."""
        if self._step < 0:
            raise RuntimeError("call reset() before step(): the episode has not started")
        if self._done:
            raise RuntimeError("the episode has ended; call reset() to start a new one")
        requested = self._requested_bits(action)
        index = self._step
        if self.bits_mode == "tied":
            b = self.problem.step_bits(index, requested[0], self._spent)
            chosen = (b, b)
        else:
            chosen = tuple(self.problem.step_bits(index, requested, self._spent))
        self._requested.append(requested)
        self._chosen.append(chosen)
        self._spent += self.problem.macs[index] * chosen[0] * chosen[1]
        self._step += 1
        if self._step < self.num_layers:
            info = {"layer": self.problem.layers[index].name,
                    "bits": self._as_reported(chosen),
                    "requested_bits": self._as_reported(requested)}  # fmt: skip
            return self._observation(), 0.0, False, False, info
        self._done = True
        w_bits, a_bits = zip(*self._chosen)
        evaluation = self.problem.evaluate(Policy(w_bits, a_bits))
        self.last_evaluation = evaluation
        reward = self.problem.reward(evaluation.certificate, self.reward_name, self.reward_radius)
        info = self._terminal_info(evaluation)
        return self._observation(), float(reward), True, False, info

    def _terminal_info(self, evaluation: Evaluation) -> dict[str, Any]:
        from arq_gym.smoothing import radius_key

        ev = evaluation.info
        certified = dict(ev["certified_accuracy"])
        key = radius_key(self.reward_radius)
        if key not in certified:
            certified[key] = evaluation.certificate.certified_accuracy(self.reward_radius)
        return {
            "w_bits": list(ev["w_bits"]),
            "a_bits": list(ev["a_bits"]),
            "requested_bits": [self._as_reported(r) for r in self._requested],
            "bops": int(ev["bops"]),
            "bops_fraction": float(ev["bops_fraction"]),
            "budget": float(ev["budget"]),
            "acr": float(ev["acr"]),
            "certified_accuracy": certified,
            "clean_accuracy": float(ev["clean_accuracy"]),
            "abstain_rate": float(ev["abstain_rate"]),
            "fp_acr": float(ev["fp_acr"]),
            "reward_name": self.reward_name,
            "eval_seconds": float(ev["eval_seconds"]),
            "cache_hit": bool(ev["cache_hit"]),
        }

    def _as_reported(self, pair: tuple[int, int]) -> int | list[int]:
        """A layer's bits as info reports them: an int (tied) or ``[w_bits, a_bits]``."""
        return int(pair[0]) if self.bits_mode == "tied" else [int(pair[0]), int(pair[1])]

    @property
    def last_certificate(self):
        """The certificate of the last finished episode (None before the first one ends)."""
        return None if self.last_evaluation is None else self.last_evaluation.certificate

    def _render_state(self) -> tuple[list[int], list[int], dict | None]:
        """Weight bits, activation bits of the layers so far (enforced once the episode ended)
        and the final evaluation's info (None while the episode runs)."""
        final = self.last_evaluation.info if self.last_evaluation is not None else None
        w_bits = list(final["w_bits"]) if final else [w for w, _ in self._chosen]
        a_bits = list(final["a_bits"]) if final else [a for _, a in self._chosen]
        return w_bits, a_bits, final

    def render(self) -> str | np.ndarray | None:
        """Render the episode so far as ``render_mode`` says (see Rendering in the class
        docstring): ``"ansi"`` a text table, ``"rgb_array"`` an RGB ``uint8`` image of shape
        ``(400, 640, 3)``; None for no or an unsupported render mode."""
        if self.render_mode == "ansi":
            return self._render_ansi()
        if self.render_mode == "rgb_array":
            return self._render_rgb_array()
        return None

    def _render_ansi(self) -> str:
        p = self.problem
        w_bits, a_bits, final = self._render_state()
        layer_bops = [p.macs[i] * w * a for i, (w, a) in enumerate(zip(w_bits, a_bits))]
        total = sum(layer_bops) or 1
        name_w = max([5] + [len(layer.name) for layer in p.layers])
        req = [str(w) if self.bits_mode == "tied" else f"{w}/{a}" for w, a in self._requested]
        req_w = max([3] + [len(r) for r in req])
        lines = [f"{'#':>3}  {'layer':<{name_w}}  {'kind':<6}  {'MACs':>6}  {'req':>{req_w}}  "
                 f"{'W':>2}  {'A':>2}  {'BOPs':>6}"]  # fmt: skip
        total_macs = sum(p.macs)
        for i, share in enumerate(layer_bops):
            layer = p.layers[i]
            lines.append(
                f"{i:>3}  {layer.name:<{name_w}}  {layer.kind:<6}  "
                f"{p.macs[i] / total_macs:>6.1%}  {req[i]:>{req_w}}  {w_bits[i]:>2}  "
                f"{a_bits[i]:>2}  {share / total:>6.1%}"
            )
        spent = sum(layer_bops)
        state = "done" if self._done else f"step {max(self._step, 0)}/{self.num_layers}"
        lines.append(
            f"{state}: {spent / p.fp32_bops:.4%} of FP32 BOPs so far, budget {p.budget:.4%}"
            + (" (enforced)" if final else "")
        )
        if final:
            lines.append(
                f"{self.reward_name} reward: ACR {final['acr']:.4f} (FP32 {final['fp_acr']:.4f}), "
                f"clean accuracy {final['clean_accuracy']:.3f}, "
                f"abstain {final['abstain_rate']:.3f}"
            )
        return "\n".join(lines)

    def _render_rgb_array(self) -> np.ndarray:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        p = self.problem
        w_bits, a_bits, final = self._render_state()
        lo, hi = self.bits
        num = self.num_layers
        if self._figure is None:
            height, width = RENDER_SIZE
            self._figure = Figure(figsize=(width / 100, height / 100), dpi=100)
            FigureCanvasAgg(self._figure)
        fig = self._figure
        fig.clear()
        ax_bits, ax_bops = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3.2, 1]})

        # bits per layer: weights and activations side by side, requested bits as ticks
        done = len(w_bits)
        x = np.arange(done)
        bars = [
            ax_bits.bar(x + offset, values, width=0.4, color=color, label=label)
            for offset, values, color, label in ((-0.2, w_bits, "#1f77b4", "weight bits"),
                                                 (0.2, a_bits, "#ff7f0e", "activation bits"))
        ]  # fmt: skip
        if self._requested:
            req_w, req_a = (np.array(v[:done]) for v in zip(*self._requested))
            ax_bits.scatter(np.concatenate([x - 0.2, x + 0.2]), np.concatenate([req_w, req_a]),
                            marker="_", s=60, color="black", linewidths=2, zorder=3,
                            label="requested")  # fmt: skip
        ax_bits.legend(loc="upper left", ncol=3, fontsize=8, frameon=False)
        for group in bars:  # after the legend, whose swatches copy the first bar's style
            for i, bar in enumerate(group):
                if i in p.pinned:
                    bar.set_hatch("//")
        if not self._done and 0 <= self._step < num:
            ax_bits.axvspan(self._step - 0.5, self._step + 0.5, color="0.9", zorder=0)
        top = max([hi, *p.pinned.values()])
        ax_bits.set_xlim(-0.6, num - 0.4)
        ax_bits.set_ylim(0, top * 1.3)  # room for the legend above the bars
        ticks = range(lo, hi + 1) if top <= 2 * hi else (lo, hi)  # sparse next to 32 bits
        ax_bits.set_yticks(sorted({*ticks, *p.pinned.values()}))
        ax_bits.set_xticks(range(0, num, 1 if num <= 25 else 1 + num // 25))
        ax_bits.set_xlabel("layer (hatched: pinned by keep_first_last)", labelpad=1)
        ax_bits.set_ylabel("bits")
        name = f"{p.architecture} / {p.dataset}, sigma {p.sigma:g}"
        if final:
            title = (f"{name}: done, ACR {final['acr']:.3f} (FP32 {final['fp_acr']:.3f}), "
                     f"clean acc. {final['clean_accuracy']:.2f}")  # fmt: skip
        else:
            title = f"{name}: step {max(self._step, 0)}/{num}"
        ax_bits.set_title(title, fontsize=10)

        # BOPs spent so far (share of FP32) against the budget
        spent = sum(p.macs[i] * w * a for i, (w, a) in enumerate(zip(w_bits, a_bits)))
        spent_pct = 100 * spent / p.fp32_bops
        budget_pct = 100 * p.budget
        needed_pct = 0.0 if self._done or self._step < 0 else (
            100 * p.min_bops_from(self._step) / p.fp32_bops)  # fmt: skip
        over = spent > p.budget_bops
        ax_bops.barh([0], [spent_pct], height=0.7, color="#d62728" if over else "#2ca02c",
                     label="spent (red: over budget)")  # fmt: skip
        if needed_pct > 0:
            ax_bops.barh([0], [needed_pct], left=[spent_pct], height=0.7, color="0.85",
                         hatch="..", label="rest at min bits")  # fmt: skip
        ax_bops.axvline(budget_pct, color="black", linestyle="--", linewidth=1.5, label="budget")
        ax_bops.set_xlim(0, 1.15 * max(budget_pct, spent_pct + needed_pct))
        ax_bops.set_ylim(-0.4, 1.2)  # room for the legend above the bar
        ax_bops.set_yticks([])
        ax_bops.set_xlabel("BOPs, % of FP32", labelpad=1)
        ax_bops.set_title(
            f"{spent_pct:.3f}% of FP32 BOPs ({float(spent / p.budget_bops):.0%} of the budget "
            f"{budget_pct:.3f}%)" + (", enforced" if final else ""), fontsize=9)  # fmt: skip
        ax_bops.legend(loc="upper left", ncol=3, fontsize=7, frameon=False)
        fig.subplots_adjust(left=0.08, right=0.98, top=0.93, bottom=0.1, hspace=0.55)

        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

    def close(self) -> None:
        """Release the figure of ``render_mode="rgb_array"``."""
        self._figure = None
        super().close()
