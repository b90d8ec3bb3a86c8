"""``arq-gym envs``: the registered environment ids, their defaults and what their fidelity means."""

from __future__ import annotations

from arq_gym.cli import command

#: keyword arguments that override a fidelity preset (None: the preset's value)
_FIDELITY_OVERRIDES = ("images", "n", "n_p", "alpha")


def _fidelity_settings(kwargs: dict) -> dict:
    """What an id's fidelity means: its preset with the id's overrides applied."""
    from arq_gym.fidelity import get_fidelity

    fid = get_fidelity(kwargs.get("fidelity", "search"),
                       **{k: kwargs.get(k) for k in _FIDELITY_OVERRIDES})  # fmt: skip
    return {"name": fid.name, "images": fid.images, "split": fid.split, "n0": fid.n0, "n": fid.n,
            "n_p": fid.n_p, "alpha": fid.alpha}  # fmt: skip


def _human_envs(res: dict) -> None:
    for env in res["envs"]:
        kw = env["kwargs"]
        fid = env["fidelity"]
        parts = []
        for k, v in kw.items():
            if k in _FIDELITY_OVERRIDES and v is None:
                continue  # shown resolved, with the fidelity
            if k == "fidelity":
                parts.append(f"fidelity={v!r} (images={fid['images']} {fid['split']}, "
                             f"n0={fid['n0']}, n={fid['n']}, n_p={fid['n_p']}, "
                             f"alpha={fid['alpha']})")  # fmt: skip
            else:
                parts.append(f"{k}={v!r}")
        print(f"{env['id']}: " + ", ".join(parts))


@command("envs", "list the registered environment ids and their defaults", human=_human_envs)(
    lambda p: None
)
def cmd_envs(args) -> dict:
    import inspect

    from arq_gym.envs import ENV_SPECS
    from arq_gym.envs.arq_env import ARQEnv

    defaults = {
        k: v.default
        for k, v in inspect.signature(ARQEnv.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    # sigma=None means "the shipped model's default (0.25), or the checkpoint's own sigma"
    defaults["sigma"] = 0.25
    envs = []
    for env_id, spec in ENV_SPECS.items():
        kwargs = {**defaults, **spec}
        if spec.get("model") is None:  # ARQ-Custom-v0: model, data and sigma are the user's
            kwargs.update(sigma=None, data=None)
        envs.append({"id": env_id, "kwargs": kwargs, "fidelity": _fidelity_settings(kwargs)})
    return {"envs": envs}


