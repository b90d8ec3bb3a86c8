"""The ARQ environment: choose a bit-width per layer, get the certified robustness as reward."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from arq_gym.problem import REWARDS, Evaluation, QuantizationProblem, make_problem

__all__ = ["ACTION_TYPES", "OBSERVATION_FEATURES", "ARQEnv", "bits_from_action"]

ACTION_TYPES = ("continuous", "discrete")
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
    "previous_bits",
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


def _minmax(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


class ARQEnv(gym.Env):
    """Mixed-precision quantization of a smoothed classifier, one layer per step.

    ## Description

    An episode walks the quantizable layers (convolutions and linear layers, in forward order)
    of a base network trained for randomized smoothing. At each step the agent picks the
    bit-width of one layer, used for the layer's weights and for its input activations. After
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

    ``action_type="continuous"`` (default): ``Box(-1, 1, (1,), float32)``, mapped HAQ-style to
    a bit-width in ``bits = (min, max)``: ``u = (a + 1) / 2``, ``b = round(min - 0.5 + u *
    (max - min + 1))`` (equal-width bins, ties up), clipped. ``action_type="discrete"``:
    ``Discrete(max - min + 1)``, action ``k`` means ``min + k`` bits. Finite out-of-range
    actions are clipped; NaN, inf, a wrong shape or a non-integer discrete action raise
    ValueError. The first and last layers are pinned at ``keep_first_last`` bits unless it is
    None; their steps still happen and their actions are ignored.

    ## Observation Space

    ``Box(0, 1, (12,), float32)``, the HAQ layer features of the layer about to be quantized,
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
    | 9  | previous_bits | bits given to the previous layer, (b - min) / (max - min),       |
    |    |               | clipped to [0, 1]; 1 at the first layer                          |
    | 10 | budget_spent  | BOPs of the layers chosen so far / the budget, clipped to [0, 1] |
    | 11 | budget_needed | BOPs of this and the remaining layers at their minimum bits /    |
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
    ``requested_bits`` (what the actions asked for), ``bops``, ``bops_fraction``, ``budget``,
    ``acr``, ``certified_accuracy`` (radius as a string such as ``"0.25"`` -> fraction),
    ``clean_accuracy``, ``abstain_rate``, ``fp_acr``, ``reward_name``, ``eval_seconds`` and
    ``cache_hit``. Other steps' info holds ``layer`` (name), ``bits`` and ``requested_bits``.

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
      most the bits that keep the remaining layers feasible at minimum bits).
    - ``action_type``: ``"continuous"`` (default) or ``"discrete"``.
    - ``fidelity``: ``"smoke"`` (16 validation images, n = 1,000, n_p = 100), ``"search"``
      (default; 100 validation images, n = 10,000, n_p = 500) or ``"paper"`` (500 test images,
      n = 100,000, n_p = 10,000); explicit overrides ``images``, ``n``, ``n_p``, ``alpha``.
    - ``device``: ``"auto"`` (default; CUDA when available), ``"cpu"`` or ``"cuda"``.
    - ``backend``: how the quantized network runs: ``"auto"`` (default; int8 integer
      convolutions under torch.compile on a CPU that has them, else float32 fake
      quantization), ``"int8-compiled"``, ``"int8"`` or ``"reference"`` (see
      :class:`~arq_gym.problem.QuantizationProblem`).
    - ``data_dir``: where the dataset is (default: ``$ARQ_GYM_DATA``, then the user cache).
    - ``cache_dir``: folder for the certification cache of the FP32 network and a persistent
      evaluation cache shared by processes (default: the user cache, evaluations in memory).
    - ``checkpoint``: path of your own base model (see :func:`arq_gym.models.save_checkpoint`).
    - ``render_mode``: None or ``"ansi"`` (a table of the layers so far, their bits and share
      of the BOPs).
    - ``noise_seed``: seed of the certification noise (default 0).
    - ``model``, ``dataset``: the shipped base model (fixed by the id).
    - ``problem``: a prebuilt :class:`~arq_gym.problem.QuantizationProblem` (then the problem
      arguments above are ignored).

    Errors are one-line exceptions: an unknown reward or option raises ValueError, an
    infeasible budget :class:`~arq_gym.budget.BudgetError`, a sigma without a shipped model and
    no checkpoint :class:`~arq_gym.models.ZooError` naming the shipped sigmas.

    ## Version History

    - v0: initial release (one step per layer, same bits for weights and input activations,
      12 observation features, IRS-based reward).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        model: str = "resnet20",
        dataset: str | None = None,
        sigma: float | None = None,
        budget: float = 1 / 64,
        reward: str = "acr",
        reward_radius: float = 0.25,
        bits: Sequence[int] = (2, 8),
        keep_first_last: int | None = 8,
        budget_mode: str = "haq",
        action_type: str = "continuous",
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
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
        if action_type not in ACTION_TYPES:
            raise ValueError(
                f"unknown action_type {action_type!r}; choose one of {', '.join(ACTION_TYPES)}"
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unsupported render_mode {render_mode!r}; use None or 'ansi'")
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
            )  # fmt: skip
        elif not isinstance(problem, QuantizationProblem):
            raise ValueError(f"problem must be a QuantizationProblem, got {type(problem).__name__}")
        self.problem = problem
        self.reward_name = reward
        self.reward_radius = float(reward_radius)
        self.action_type = action_type
        self.render_mode = render_mode
        self.bits = problem.bits
        self.num_layers = problem.num_layers

        lo, hi = self.bits
        if action_type == "continuous":
            self.action_space = spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
        else:
            self.action_space = spaces.Discrete(hi - lo + 1)
        self.observation_space = spaces.Box(
            0.0, 1.0, (len(OBSERVATION_FEATURES),), dtype=np.float32
        )
        self._layer_features = self._static_features()
        self._step = -1  # -1: not reset
        self._done = False
        self._requested: list[int] = []
        self._chosen: list[int] = []
        self._spent = 0
        self.last_evaluation: Evaluation | None = None

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
        if self._chosen:
            prev = (self._chosen[-1] - lo) / (hi - lo) if hi > lo else 1.0
        else:
            prev = 1.0
        budget = float(self.problem.budget_bops)
        spent = self._spent / budget
        left = budget - self._spent
        if self._step >= self.num_layers:
            needed = 0.0
        else:
            needed = self.problem.min_bops_from(self._step) / left if left > 0 else 1.0
        obs = np.concatenate([self._layer_features[index], [prev, spent, needed]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------ actions

    def _requested_bits(self, action: Any) -> int:
        try:
            arr = np.asarray(action)
            if arr.dtype == object:
                raise TypeError
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"action must be a number, got {action!r}") from None
        expected = "(1,)" if self.action_type == "continuous" else "() or (1,)"
        if arr.shape not in ((1,), ()):
            raise ValueError(f"action must have shape {expected}, got shape {arr.shape}")
        value = float(arr.reshape(-1)[0])
        if not math.isfinite(value):
            raise ValueError(f"action must be finite, got {value}")
        lo, hi = self.bits
        if self.action_type == "continuous":
            return bits_from_action(value, self.bits)
        if value != round(value):
            raise ValueError(f"discrete action must be an integer, got {value}")
        return int(min(max(lo + int(round(value)), lo), hi))

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
        chosen = self.problem.step_bits(index, requested, self._spent)
        self._requested.append(requested)
        self._chosen.append(chosen)
        self._spent += self.problem.macs[index] * chosen * chosen
        self._step += 1
        if self._step < self.num_layers:
            info = {"layer": self.problem.layers[index].name, "bits": chosen,
                    "requested_bits": requested}  # fmt: skip
            return self._observation(), 0.0, False, False, info
        self._done = True
        evaluation = self.problem.evaluate(self._chosen)
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
            "requested_bits": list(self._requested),
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

    @property
    def last_certificate(self):
        """The certificate of the last finished episode (None before the first one ends)."""
        return None if self.last_evaluation is None else self.last_evaluation.certificate

    def render(self) -> str | None:
        """``render_mode="ansi"``: a table of the layers so far, their bits and BOPs share."""
        if self.render_mode != "ansi":
            return None
        p = self.problem
        final = self.last_evaluation.info if self.last_evaluation is not None else None
        w_bits = final["w_bits"] if final else list(self._chosen)
        a_bits = final["a_bits"] if final else list(self._chosen)
        layer_bops = [p.macs[i] * w * a for i, (w, a) in enumerate(zip(w_bits, a_bits))]
        total = sum(layer_bops) or 1
        name_w = max([5] + [len(layer.name) for layer in p.layers])
        lines = [f"{'#':>3}  {'layer':<{name_w}}  {'kind':<6}  {'MACs':>6}  {'req':>3}  "
                 f"{'W':>2}  {'A':>2}  {'BOPs':>6}"]  # fmt: skip
        total_macs = sum(p.macs)
        for i, share in enumerate(layer_bops):
            layer = p.layers[i]
            lines.append(
                f"{i:>3}  {layer.name:<{name_w}}  {layer.kind:<6}  "
                f"{p.macs[i] / total_macs:>6.1%}  {self._requested[i]:>3}  {w_bits[i]:>2}  "
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
