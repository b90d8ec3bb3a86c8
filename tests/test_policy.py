"""Policy type and the arq-policy/1 file (arq_gym.policy)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from arq_gym.cost import bops_fraction
from arq_gym.policy import Policy, PolicyError, load_policy, save_policy
from arq_gym.quant import LayerInfo


def layers(n: int = 4) -> list[LayerInfo]:
    return [
        LayerInfo(
            i,
            f"block{i}.conv",
            "conv",
            4,
            4,
            (3, 3),
            (1, 1),
            1,
            False,
            8,
            8,
            8,
            8,
            144,
            144 * 64 * (i + 1),
        )  # fmt: skip
        for i in range(n)
    ]


def test_policy_construction():
    p = Policy([4, np.int64(5), 6], (2, 3, 4.0))
    assert p.w_bits == (4, 5, 6) and p.a_bits == (2, 3, 4)
    assert all(type(b) is int for b in p.w_bits + p.a_bits)
    assert len(p) == p.num_layers == 3
    assert hash(p) == hash(Policy((4, 5, 6), (2, 3, 4)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.w_bits = (8, 8, 8)  # type: ignore[misc]
    assert Policy.uniform(5, 4) == Policy((8, 4, 4, 4, 8), (8, 4, 4, 4, 8))
    assert Policy.uniform(3, 3, None) == Policy.from_bits([3, 3, 3])
    assert Policy.uniform(1, 4, 6) == Policy((6,), (6,))
    assert Policy.from_bits([2, 5]).to_dict() == {"w_bits": [2, 5], "a_bits": [2, 5]}


@pytest.mark.parametrize(
    "w, a, match",
    [
        ((4, 4), (4,), "2 w_bits but 1 a_bits"),
        ((), (), "no layers"),
        ((4, 4.5), (4, 4), r"w_bits\[1\] = 4.5 is not an integer"),
        ((4, "x"), (4, 4), r"w_bits\[1\] = 'x' is not an integer"),
        ((4, 4), (True, 4), r"a_bits\[0\] = True is not an integer"),
    ],
)
def test_policy_rejects(w, a, match):
    with pytest.raises(PolicyError, match=match):
        Policy(w, a)


def test_check_names_layer():
    lay = layers(3)
    Policy((2, 8, 32), (32, 5, 3)).check(lay)
    with pytest.raises(ValueError, match=r"layer 1 \(block1.conv\): a_bits = 9 is not in \[2, 8\]"):
        Policy((4, 4, 4), (4, 9, 4)).check(lay)
    with pytest.raises(ValueError, match="policy has 2 layers but the model has 3"):
        Policy.uniform(2, 4).check(lay)


def test_save_load_roundtrip(tmp_path):
    lay = layers()
    p = Policy((8, 3, 5, 8), (8, 4, 2, 8))
    path = tmp_path / "sub" / "best_policy.json"
    metrics = {"acr": np.float64(0.51), "fidelity": "search", "certified_accuracy": {"0.25": 0.6}}
    save_policy(path, p, lay, env_id="ARQ-ResNet20-v0", model="resnet20", dataset="cifar10",
                sigma=0.25, metrics=metrics)  # fmt: skip
    doc = json.loads(path.read_text())
    assert doc["format"] == "arq-policy/1"
    assert doc["env_id"] == "ARQ-ResNet20-v0" and doc["model"] == "resnet20"
    assert doc["dataset"] == "cifar10" and doc["sigma"] == 0.25
    assert doc["layers"][1] == {"name": "block1.conv", "w_bits": 3, "a_bits": 4, "macs": 144 * 128}
    assert doc["bops_fraction"] == bops_fraction(lay, p)
    assert doc["metrics"]["acr"] == 0.51
    q, meta = load_policy(path, lay)
    assert q == p and meta["metrics"]["fidelity"] == "search"
    assert load_policy(path)[0] == p


def _write(tmp_path, doc) -> str:
    path = tmp_path / "p.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _good() -> dict:
    return {
        "format": "arq-policy/1",
        "env_id": None,
        "model": "resnet20",
        "dataset": "cifar10",
        "sigma": 0.25,
        "layers": [
            {"name": "block0.conv", "w_bits": 8, "a_bits": 8, "macs": 9216},
            {"name": "block1.conv", "w_bits": 4, "a_bits": 4, "macs": 18432},
        ],
        "bops_fraction": 0.1,
        "metrics": {},
    }


def _edit(path_keys, value):
    doc = _good()
    target = doc
    for k in path_keys[:-1]:
        target = target[k]
    if value is KeyError:
        del target[path_keys[-1]]
    else:
        target[path_keys[-1]] = value
    return doc


@pytest.mark.parametrize(
    "doc, match",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "top level is not a JSON object"),
        (_edit(["format"], "arq-policy/2"), "format is 'arq-policy/2'"),
        (_edit(["layers"], []), "'layers' must be a non-empty list"),
        (_edit(["layers", 1, "a_bits"], KeyError), r"layers\[1\] has no 'a_bits'"),
        (_edit(["layers", 1, "w_bits"], 9), r"layers\[1\] \(block1.conv\): w_bits = 9"),
        (_edit(["layers", 0, "a_bits"], "8"), r"layers\[0\] \(block0.conv\): a_bits = '8'"),
        (_edit(["layers", 0, "macs"], -1), r"macs = -1 is not an integer"),
        (_edit(["sigma"], -0.5), "sigma = -0.5 is not a positive number"),
        (_edit(["metrics"], [1]), "'metrics' is not an object"),
    ],
)
def test_load_rejects(tmp_path, doc, match):
    path = _write(tmp_path, doc)
    with pytest.raises(PolicyError, match=match) as e:
        load_policy(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_load_for_another_model(tmp_path):
    path = _write(tmp_path, _good())
    with pytest.raises(PolicyError, match="policy has 2 layers but the model has 4"):
        load_policy(path, layers(4))
    renamed = [dataclasses.replace(layer, name=f"x{layer.index}") for layer in layers(2)]
    with pytest.raises(PolicyError, match="layer 0 is 'block0.conv' in the file but 'x0'"):
        load_policy(path, renamed)
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "missing.json")
