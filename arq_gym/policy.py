"""Mixed-precision policies (bit-widths per quantizable layer) and the ``arq-policy/1`` file.

A :class:`Policy` holds one weight bit-width and one input-activation bit-width per quantizable
layer, in forward order (the order of :func:`arq_gym.quant.find_layers`). A bit-width is an
integer in [2, 8], or 32 for "keep this tensor in float".

The file format (design.md, "Files")::

    {"format": "arq-policy/1", "env_id": ..., "model": ..., "dataset": ..., "sigma": ...,
     "layers": [{"name": ..., "w_bits": ..., "a_bits": ..., "macs": ...}, ...],
     "bops_fraction": ..., "metrics": {...}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arq_gym.files import json_default

if TYPE_CHECKING:
    from arq_gym.quant import LayerInfo

POLICY_FORMAT = "arq-policy/1"
#: bit-widths a quantizer accepts; 32 means float (not quantized)
MIN_BITS, MAX_BITS, FLOAT_BITS = 2, 8, 32


class PolicyError(ValueError):
    """A policy (object or file) is malformed or does not fit the model; one-line message."""


def valid_bits(b: int) -> bool:
    """True for a bit-width a quantizer accepts: an int in [2, 8] or 32 (float)."""
    return isinstance(b, int) and not isinstance(b, bool) and (MIN_BITS <= b <= MAX_BITS or b == 32)


def _as_int_tuple(values: Iterable[Any], what: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            # accept numpy integers and integral floats coming from agents / JSON
            try:
                iv = int(v)
            except (TypeError, ValueError):
                raise PolicyError(f"{what}[{i}] = {v!r} is not an integer bit-width") from None
            if isinstance(v, bool) or iv != v:
                raise PolicyError(f"{what}[{i}] = {v!r} is not an integer bit-width")
            v = iv
        out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class Policy:
    """Bit-widths per quantizable layer: ``w_bits[i]`` for weights, ``a_bits[i]`` for the input.

    Lists and numpy integers are accepted and stored as tuples of Python ints; both tuples must
    have the same non-zero length. Ranges are checked where the policy is used
    (:meth:`arq_gym.quant.QuantizedModel.apply`, :mod:`arq_gym.budget`), which know the layers.
    """

    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]

    def __post_init__(self) -> None:
        w = _as_int_tuple(self.w_bits, "w_bits")
        a = _as_int_tuple(self.a_bits, "a_bits")
        if len(w) != len(a):
            raise PolicyError(f"policy has {len(w)} w_bits but {len(a)} a_bits")
        if not w:
            raise PolicyError("policy has no layers")
        object.__setattr__(self, "w_bits", w)
        object.__setattr__(self, "a_bits", a)

    def __len__(self) -> int:
        return len(self.w_bits)

    @property
    def num_layers(self) -> int:
        """Number of layers the policy covers."""
        return len(self.w_bits)

    @classmethod
    def uniform(cls, num_layers: int, bits: int, keep_first_last: int | None = 8) -> Policy:
        """``bits`` for weights and activations of every layer; the first and last layers get
        ``keep_first_last`` bits (both tensors) unless it is None."""
        if num_layers < 1:
            raise PolicyError(f"num_layers must be >= 1, got {num_layers}")
        b = [bits] * num_layers
        if keep_first_last is not None:
            b[0] = b[-1] = keep_first_last
        return cls(tuple(b), tuple(b))

    @classmethod
    def from_bits(cls, bits: Sequence[int]) -> Policy:
        """One bit-width per layer used for both weights and input activations."""
        t = _as_int_tuple(bits, "bits")
        return cls(t, t)

    def check(self, layers: Sequence[LayerInfo] | int) -> None:
        """Raise :class:`PolicyError` unless the policy fits ``layers`` (count) and every
        bit-width is in [2, 8] or 32; the message names the offending layer."""
        n = layers if isinstance(layers, int) else len(layers)
        if len(self) != n:
            raise PolicyError(
                f"policy has {len(self)} layers but the model has {n} quantizable layers"
            )
        for i, (w, a) in enumerate(zip(self.w_bits, self.a_bits)):
            name = "" if isinstance(layers, int) else f" ({layers[i].name})"
            for kind, b in (("w_bits", w), ("a_bits", a)):
                if not valid_bits(b):
                    raise PolicyError(
                        f"layer {i}{name}: {kind} = {b} is not in [{MIN_BITS}, {MAX_BITS}] "
                        f"or {FLOAT_BITS} (float)"
                    )

    def to_dict(self) -> dict[str, list[int]]:
        """``{"w_bits": [...], "a_bits": [...]}``."""
        return {"w_bits": list(self.w_bits), "a_bits": list(self.a_bits)}


def save_policy(
    path: str | Path,
    policy: Policy,
    layers: Sequence[LayerInfo],
    *,
    env_id: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    sigma: float | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``policy`` for ``layers`` as an ``arq-policy/1`` JSON file; return the document."""
    from arq_gym.cost import bops_fraction

    policy.check(layers)
    doc = {
        "format": POLICY_FORMAT,
        "env_id": env_id,
        "model": model,
        "dataset": dataset,
        "sigma": None if sigma is None else float(sigma),
        "layers": [
            {"name": layer.name, "w_bits": w, "a_bits": a, "macs": int(layer.macs)}
            for layer, w, a in zip(layers, policy.w_bits, policy.a_bits)
        ],
        "bops_fraction": bops_fraction(layers, policy),
        "metrics": dict(metrics or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=json_default) + "\n")
    return doc


def load_policy(
    path: str | Path, layers: Sequence[LayerInfo] | None = None
) -> tuple[Policy, dict[str, Any]]:
    """Read and validate an ``arq-policy/1`` file; return ``(policy, document)``.

    With ``layers`` given, the policy must also match that model (number of layers and names).
    Every problem raises :class:`PolicyError` with a one-line message naming the file.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"policy file {path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise PolicyError(f"policy file {path} is not valid JSON: {e}") from None

    def bad(msg: str) -> PolicyError:
        return PolicyError(f"policy file {path}: {msg}")

    if not isinstance(doc, dict):
        raise bad("top level is not a JSON object")
    if doc.get("format") != POLICY_FORMAT:
        raise bad(f"format is {doc.get('format')!r}, expected {POLICY_FORMAT!r}")
    entries = doc.get("layers")
    if not isinstance(entries, list) or not entries:
        raise bad("'layers' must be a non-empty list")
    w_bits, a_bits = [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise bad(f"layers[{i}] is not an object")
        for key in ("name", "w_bits", "a_bits", "macs"):
            if key not in e:
                raise bad(f"layers[{i}] has no {key!r}")
        if not isinstance(e["name"], str):
            raise bad(f"layers[{i}].name is not a string")
        for key in ("w_bits", "a_bits"):
            if not valid_bits(e[key]):
                raise bad(
                    f"layers[{i}] ({e['name']}): {key} = {e[key]!r} is not in "
                    f"[{MIN_BITS}, {MAX_BITS}] or {FLOAT_BITS}"
                )
        if isinstance(e["macs"], bool) or not isinstance(e["macs"], int) or e["macs"] < 0:
            raise bad(f"layers[{i}] ({e['name']}): macs = {e['macs']!r} is not an integer >= 0")
        w_bits.append(e["w_bits"])
        a_bits.append(e["a_bits"])
    sigma = doc.get("sigma")
    if sigma is not None and (
        isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0
    ):
        raise bad(f"sigma = {sigma!r} is not a positive number")
    frac = doc.get("bops_fraction")
    if frac is not None and (
        isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac)
    ):
        raise bad(f"bops_fraction = {frac!r} is not a number")
    if "metrics" in doc and doc["metrics"] is not None and not isinstance(doc["metrics"], dict):
        raise bad("'metrics' is not an object")
    policy = Policy(tuple(w_bits), tuple(a_bits))
    if layers is not None:
        if len(layers) != len(policy):
            raise bad(
                f"policy has {len(policy)} layers but the model has {len(layers)} "
                "quantizable layers (a policy for another model?)"
            )
        for i, (e, layer) in enumerate(zip(entries, layers)):
            if e["name"] != layer.name:
                raise bad(f"layer {i} is {e['name']!r} in the file but {layer.name!r} in the model")
    return policy, doc
