"""The result of a certification: per-image arrays and summary metrics."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def radius_key(r: float) -> str:
    """The key of radius ``r`` in ``summary()["certified_accuracy"]``: ``str(float(r))``,
    e.g. ``"0.0"``, ``"0.25"``, ``"1.0"``."""
    return str(float(r))


@dataclass
class Certificate:
    """Certification of N images by a smoothed classifier.

    Per image (numpy arrays of length N): ``idx`` (index of the image in its split),
    ``label``, ``predict`` (class, -1 = abstain), ``radius`` (certified l2 radius, 0 when
    abstaining or for the misclassified shortcut of incremental certification), ``correct``
    (``predict == label``), ``pa_lower`` (the lower confidence bound of the top class
    probability that gave the radius), ``zeta`` (incremental certification: upper bound of the
    disagreement probability; NaN where unused), ``time`` (seconds attributed to the image,
    in proportion to its forward passes, since images are batched together).

    Whole run: ``sigma``, ``alpha`` (overall failure probability per image), ``forward_passes``
    (noisy samples sent through the network), ``seconds`` (wall clock), ``meta`` (free-form).
    """

    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    pa_lower: np.ndarray
    zeta: np.ndarray
    sigma: float
    alpha: float
    forward_passes: int
    seconds: float
    time: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.label)
        self.idx = np.asarray(self.idx, dtype=np.int64)
        self.label = np.asarray(self.label, dtype=np.int64)
        self.predict = np.asarray(self.predict, dtype=np.int64)
        self.radius = np.asarray(self.radius, dtype=np.float64)
        self.correct = np.asarray(self.correct, dtype=bool)
        self.pa_lower = np.asarray(self.pa_lower, dtype=np.float64)
        self.zeta = np.asarray(self.zeta, dtype=np.float64)
        self.time = np.zeros(n) if self.time is None else np.asarray(self.time, dtype=np.float64)
        for name in ("idx", "predict", "radius", "correct", "pa_lower", "zeta", "time"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Certificate.{name} has {len(getattr(self, name))} entries, expected {n}"
                )
        self.forward_passes = int(self.forward_passes)
        self.seconds = float(self.seconds)
        self.sigma = float(self.sigma)
        self.alpha = float(self.alpha)

    def __len__(self) -> int:
        return len(self.label)

    def to_dict(self) -> dict:
        """Every field, arrays as lists (JSON-ready; :meth:`from_dict` inverts it)."""
        return {
            f.name: (v.tolist() if isinstance(v, np.ndarray) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, data: dict) -> Certificate:
        """The certificate :meth:`to_dict` described."""
        return cls(**data)

    @classmethod
    def concatenate(cls, parts: Iterable[Certificate]) -> Certificate:
        """One certificate of the images of ``parts``, in order (they must share sigma and
        alpha); forward passes and seconds add up, ``meta`` is the first part's."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({(p.sigma, p.alpha) for p in parts}) != 1:
            raise ValueError("certificates with different sigma or alpha cannot be concatenated")
        arrays = {name: np.concatenate([getattr(p, name) for p in parts])
                  for name in ("idx", "label", "predict", "radius", "correct", "pa_lower", "zeta",
                               "time")}  # fmt: skip
        return cls(**arrays, sigma=parts[0].sigma, alpha=parts[0].alpha,
                   forward_passes=sum(p.forward_passes for p in parts),
                   seconds=sum(p.seconds for p in parts), meta=dict(parts[0].meta))  # fmt: skip

    @property
    def clean_accuracy(self) -> float:
        """Accuracy of the smoothed classifier (certified accuracy at radius 0)."""
        return float(self.correct.mean()) if len(self) else 0.0

    @property
    def acr(self) -> float:
        """Average certified radius, counting 0 for wrong or abstained images."""
        return float(np.where(self.correct, self.radius, 0.0).mean()) if len(self) else 0.0

    @property
    def abstain_rate(self) -> float:
        """Fraction of images where the smoothed classifier abstains."""
        return float((self.predict < 0).mean()) if len(self) else 0.0

    def certified_accuracy(self, r: float) -> float:
        """Fraction of images correctly classified and certified with radius >= ``r``."""
        if not len(self):
            return 0.0
        return float((self.correct & (self.radius >= float(r))).mean())

    def per_image_radius(self) -> np.ndarray:
        """Each image's contribution to the ACR: its radius, 0 where wrong or abstained."""
        return np.where(self.correct, self.radius, 0.0)

    def acr_interval(self, confidence: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float]:  # fmt: skip
        """Bootstrap interval of the ACR over the images (the sampling uncertainty of the image
        sample, not of the noise): ``scipy.stats.bootstrap``, BCa, seeded."""
        return bootstrap_interval(self.per_image_radius(), confidence, resamples, seed)

    def summary(self, radii: Iterable[float] = DEFAULT_RADII) -> dict:
        """Metrics as a JSON-ready dict: images, clean_accuracy, certified_accuracy (radius
        string from :func:`radius_key` -> fraction), acr, abstain_rate, forward_passes, seconds."""
        return {
            "images": len(self),
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": {radius_key(r): self.certified_accuracy(r) for r in radii},
            "acr": self.acr,
            "abstain_rate": self.abstain_rate,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
        }

    def to_tsv(self, path: str | os.PathLike) -> None:
        """Write the per-image table in the layout of Cohen et al.'s ``certify.py``:
        ``idx label predict radius correct time`` (time as ``H:MM:SS.ffffff``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
        for i in range(len(self)):
            t = str(datetime.timedelta(seconds=float(self.time[i])))
            lines.append(
                f"{self.idx[i]}\t{self.label[i]}\t{self.predict[i]}\t"
                f"{self.radius[i]:.4f}\t{int(self.correct[i])}\t{t}"
            )
        path.write_text("\n".join(lines) + "\n")

    @classmethod
    def from_tsv(cls, path: str | os.PathLike, sigma: float = float("nan"),
                 alpha: float = float("nan")) -> Certificate:  # fmt: skip
        """The certificate a :meth:`to_tsv` file holds. The table does not keep ``pa_lower``,
        ``zeta``, sigma, alpha, forward passes or seconds: ``pa_lower`` and ``zeta`` come back
        NaN, sigma and alpha as given (NaN by default), the totals 0; radii have 4 decimals."""
        rows = [line.split("\t") for line in Path(path).read_text().splitlines()[1:] if line]
        if any(len(r) != 6 for r in rows):
            raise ValueError(f"{path}: not a certificate table (idx label predict radius "
                             "correct time)")  # fmt: skip

        def seconds(text: str) -> float:
            h, m, s = text.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)

        n = len(rows)
        column = list(zip(*rows)) if rows else [()] * 6
        return cls(idx=[int(v) for v in column[0]], label=[int(v) for v in column[1]],
                   predict=[int(v) for v in column[2]], radius=[float(v) for v in column[3]],
                   correct=[v == "1" for v in column[4]], pa_lower=np.full(n, np.nan),
                   zeta=np.full(n, np.nan), time=[seconds(v) for v in column[5]], sigma=sigma,
                   alpha=alpha, forward_passes=0, seconds=0.0)  # fmt: skip

    def to_json(
        self, path: str | os.PathLike | None = None, radii: Iterable[float] = DEFAULT_RADII, **extra
    ) -> str:
        """The summary (plus sigma, alpha and ``extra`` keys) as a JSON string; written to
        ``path`` too when given."""
        data = self.summary(radii) | {"sigma": self.sigma, "alpha": self.alpha} | extra
        text = json.dumps(data, indent=2, default=float)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text


def bootstrap_interval(values: np.ndarray, confidence: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """BCa bootstrap interval of the mean of ``values`` (``scipy.stats.bootstrap``, seeded);
    the mean itself twice when the values are constant or fewer than two."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        m = float(values.mean()) if len(values) else 0.0
        return m, m
    res = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=resamples,
                    method="BCa", random_state=np.random.default_rng(seed))  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_acr_difference(a: Certificate, b: Certificate, confidence: float = 0.95,
                          resamples: int = 10_000, seed: int = 0) -> dict:  # fmt: skip
    """ACR of ``a`` minus ACR of ``b`` on the same images, with a paired bootstrap interval
    (images resampled together); ``significant`` when the interval excludes 0."""
    if len(a) != len(b) or not np.array_equal(a.idx, b.idx):
        raise ValueError("paired comparison needs certificates of the same images")
    diff = a.per_image_radius() - b.per_image_radius()
    low, high = bootstrap_interval(diff, confidence, resamples, seed)
    return {"difference": float(diff.mean()), "low": low, "high": high,
            "significant": bool(low > 0 or high < 0)}  # fmt: skip
