"""Quickstart: one episode of ARQ-ResNet20-v0 with random bit-widths, then its certificate.

    python examples/quickstart.py                      # fidelity "smoke": 16 images, seconds
    python examples/quickstart.py --fidelity search    # the default search fidelity

Each step picks the bit-width of one layer (weights and input activations). After the last
layer the policy is fitted to the BOPs budget (1/64 of FP32, the cost of uniform W4A4) and
the smoothed quantized network is certified; the reward is its average certified radius.
"""

from __future__ import annotations

import argparse

import gymnasium as gym

import arq_gym  # noqa: F401  (registers the environments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="ARQ-ResNet20-v0", help="environment id")
    parser.add_argument("--fidelity", default="smoke", choices=["smoke", "search", "paper"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random actions")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--checkpoint", default=None, help="your own base model (optional)")
    args = parser.parse_args()

    kwargs = {"fidelity": args.fidelity, "device": args.device, "render_mode": "ansi"}
    if args.checkpoint:
        kwargs["checkpoint"] = args.checkpoint
    env = gym.make(args.env, **kwargs)
    env.action_space.seed(args.seed)
    obs, info = env.reset(seed=args.seed)
    print(f"{args.env}: {env.unwrapped.num_layers} layers, observation {obs.shape}, "
          f"action space {env.action_space}")  # fmt: skip

    terminated = False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

    print(env.render())
    print(f"\nreward ({info['reward_name']}): {reward:.4f}")
    print(f"requested bits: {info['requested_bits']}")
    print(f"enforced  W:    {info['w_bits']}")
    print(f"enforced  A:    {info['a_bits']}")
    print(f"BOPs: {info['bops_fraction']:.4%} of FP32 (budget {info['budget']:.4%})")
    print(f"certified accuracy: {info['certified_accuracy']}")
    print(f"clean accuracy {info['clean_accuracy']:.3f}, abstain rate "
          f"{info['abstain_rate']:.3f}, FP32 ACR {info['fp_acr']:.4f}, "
          f"evaluated in {info['eval_seconds']:.2f} s")  # fmt: skip

    cert = env.unwrapped.last_certificate  # per-image results (arq_gym.smoothing.Certificate)
    print("\nidx\tlabel\tpredict\tradius\tcorrect")
    for i in range(len(cert)):
        print(f"{cert.idx[i]}\t{cert.label[i]}\t{cert.predict[i]}\t{cert.radius[i]:.3f}\t"
              f"{int(cert.correct[i])}")  # fmt: skip
    env.close()


if __name__ == "__main__":
    main()
