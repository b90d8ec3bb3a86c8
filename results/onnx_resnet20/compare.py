"""Compare `arq-gym certify --onnx` with `arq-gym certify --policy/--uniform` (same images,
same noise) for the rows run.sh measured; prints a Markdown table.

The TSVs keep radii to four decimals, not the counts, so each radius is mapped back to the count
n_A (of n) whose Clopper-Pearson lower bound gives it; the count differences are then set beside
the disagreements the export check measured (its fraction times n samples per image)."""

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import beta, norm


def read_tsv(path):
    rows = [line.split("\t") for line in Path(path).read_text().splitlines()[1:]]
    return {int(r[0]): (int(r[2]), float(r[3])) for r in rows}


def counts(radii, sigma, n, alpha):
    """n_A for each radius: the count whose one-sided Clopper-Pearson bound gives that radius."""
    k = np.arange(n // 2, n + 1)
    lower = beta.ppf(alpha, k, n - k + 1)
    table = np.round(sigma * norm.ppf(lower), 4)
    return np.array([k[np.argmin(np.abs(table - r))] for r in radii])


def main(folder):
    folder = Path(folder)
    print("| row | disagreements / noisy samples (export) | images | same prediction | same radius "
          "| max abs radius diff | mean / max abs n_A diff (of n) | expected disagreements per image "
          "| ACR onnx | ACR own path | own path function | seconds onnx / own |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("w8a8", "w4a4", "arq"):
        exp = json.loads((folder / f"{name}.export.json").read_text())
        onnx_sum = json.loads((folder / f"{name}.onnx.json").read_text())
        own_sum = json.loads((folder / f"{name}.policy.json").read_text())
        a, b = read_tsv(folder / f"{name}.onnx.tsv"), read_tsv(folder / f"{name}.policy.tsv")
        idx = sorted(a)
        assert idx == sorted(b), "the two runs certified different images"
        pa, pb = np.array([a[i][0] for i in idx]), np.array([b[i][0] for i in idx])
        ra, rb = np.array([a[i][1] for i in idx]), np.array([b[i][1] for i in idx])
        both = (pa >= 0) & (pb >= 0) & (pa == pb)
        n, alpha, sigma = own_sum["n"], own_sum["alpha"], own_sum["sigma"]
        dn = np.abs(counts(ra[both], sigma, n, alpha) - counts(rb[both], sigma, n, alpha))
        check = exp["check"]
        print(f"| {name} | {check['disagreements']} / {check['samples']:,} | {len(idx)} "
              f"| {int((pa == pb).sum())} | {int((ra == rb).sum())} | {np.abs(ra - rb).max():.4f} "
              f"| {dn.mean():.2f} / {dn.max()} | {check['fraction'] * n:.1f} "
              f"| {onnx_sum['acr']:.4f} | {own_sum['acr']:.4f} | {own_sum['function']} "
              f"| {onnx_sum['seconds']:.0f} / {own_sum['seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
