"""Paired comparison of two certifications of the same images (the B - A figures of the READMEs).

    python results/scripts/compare_certificates.py A.tsv B.tsv

Reads two `arq-gym certify --out` tables, and prints certified accuracy at radius 0 (with the
images B gains and loses against A), at r = 0.5 and 1.0, and the ACR of each with their paired
difference and its 95% BCa bootstrap interval (`arq_gym.smoothing.paired_acr_difference`).
"""

from __future__ import annotations

import argparse
import sys

from arq_gym.smoothing import Certificate, paired_acr_difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="certificate table A (the reference)")
    parser.add_argument("b", help="certificate table B (compared with A)")
    args = parser.parse_args(argv)
    try:
        a, b = Certificate.from_tsv(args.a), Certificate.from_tsv(args.b)
        diff = paired_acr_difference(b, a)
    except (OSError, ValueError) as err:
        print(f"compare_certificates: {err}", file=sys.stderr)
        return 2
    gained, lost = int((b.correct & ~a.correct).sum()), int((a.correct & ~b.correct).sum())
    print(f"images {len(a)}  r=0 {a.clean_accuracy:.3f} -> {b.clean_accuracy:.3f}  "
          f"gained {gained} lost {lost}")  # fmt: skip
    for r in (0.5, 1.0):
        print(f"  r={r}: {a.certified_accuracy(r):.3f} -> {b.certified_accuracy(r):.3f}")
    print(f"  ACR {a.acr:.3f} -> {b.acr:.3f}  diff {diff['difference']:+.3f} "
          f"[{diff['low']:+.3f}, {diff['high']:+.3f}]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
