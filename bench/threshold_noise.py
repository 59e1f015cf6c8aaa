"""How far a threshold chosen on a validation set of a given size lands on other X-rays.

    python -m bench.threshold_noise outputs/crossval/oof.csv [--column probability] \
        [--val 85:404 --val 240:1140] [--draws 2000] [--sensitivity 0.85] [--specificity 0.85]

The evaluate stage serves the highest threshold whose sensitivity on the val split reaches
``evaluate.target_sensitivity`` (:func:`fracture.evaluation.choose_threshold`). With few
fractured images in val, that threshold is itself an estimate. This reads the crossval stage's
out-of-fold probabilities (every train + val image scored by a network that did not train on
it; no test image) and, ``--draws`` times per ``--val`` size (fractured:not fractured), draws a
validation set of that size at random, chooses the threshold on it by the same rule, and scores
the remaining images at that threshold. It prints the median and 5th-95th percentiles of their
sensitivity and specificity, and how often both reach the target (``--sensitivity`` and
``--specificity``, the CPU profile's 0.85 and 0.85). That spread holds two things: where the
threshold lands, and the left-out images' own sampling; beside it, the 5th-95th percentiles of
the second alone (binomial, at the median rate and the left-out counts) show how much is the
threshold's. A test split smaller than the left-out images samples more widely still.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binom

from fracture.evaluation import choose_threshold


def held_out_rates(
    labels: np.ndarray, probs: np.ndarray, n_fractured: int, n_other: int, draws: int, sensitivity: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Sensitivity and specificity (one row per draw) of the images left out of each drawn val set,
    at the threshold chosen on that set."""
    fractured, other = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if n_fractured >= len(fractured) or n_other >= len(other):
        raise SystemExit(f"--val {n_fractured}:{n_other} leaves no images out: the file has {len(fractured)} "
                         f"fractured and {len(other)} other images")
    rates = np.empty((draws, 2))
    for i in range(draws):
        val = np.r_[rng.choice(fractured, n_fractured, replace=False), rng.choice(other, n_other, replace=False)]
        rest = np.ones(len(labels), dtype=bool)
        rest[val] = False
        threshold = choose_threshold(labels[val], probs[val], sensitivity)
        called = probs[rest] >= threshold
        rates[i] = called[labels[rest] == 1].mean(), (~called[labels[rest] == 0]).mean()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("oof", type=Path, help="the crossval stage's oof.csv (label and probability columns)")
    parser.add_argument("--column", action="append", default=None,
                        help="probability column(s) to read (default: probability)")
    parser.add_argument("--val", action="append", default=None,
                        help="a val size as fractured:other (default: 85:404, the split's val, and 240:1140)")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--sensitivity", type=float, default=0.85, help="the sensitivity the threshold is chosen for")
    parser.add_argument("--specificity", type=float, default=0.85, help="the specificity the target asks beside it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    oof = pd.read_csv(args.oof)
    if "label" not in oof:
        raise SystemExit(f"{args.oof}: no label column; it has {', '.join(oof.columns)}")
    labels = oof["label"].to_numpy()
    sizes = []
    for size in args.val or ["85:404", "240:1140"]:
        counts = size.split(":")
        if len(counts) != 2 or not all(c.isdigit() and int(c) > 0 for c in counts):
            raise SystemExit(f"--val {size}: give the val set's size as fractured:other, e.g. 85:404")
        sizes.append((int(counts[0]), int(counts[1])))
    print(f"{args.oof}: {len(oof)} images, {int(labels.sum())} fractured; {args.draws} draws per val size; "
          f"threshold: the highest reaching sensitivity {args.sensitivity} on the drawn val set")
    for column in args.column or ["probability"]:
        if column not in oof:
            raise SystemExit(f"{args.oof}: no column {column!r}; it has {', '.join(oof.columns)}")
        for n_fractured, n_other in sizes:
            rng = np.random.default_rng(args.seed)  # the same draws for every column and size given
            rates = held_out_rates(labels, oof[column].to_numpy(), n_fractured, n_other, args.draws,
                                   args.sensitivity, rng)
            spread = [f"{np.median(r):.3f} ({np.quantile(r, 0.05):.3f}-{np.quantile(r, 0.95):.3f})" for r in rates.T]
            both = ((rates[:, 0] >= args.sensitivity) & (rates[:, 1] >= args.specificity)).mean()
            left = (int(labels.sum()) - n_fractured, int((labels == 0).sum()) - n_other)
            sampling = [f"{binom.ppf(0.05, n, np.median(r)) / n:.3f}-{binom.ppf(0.95, n, np.median(r)) / n:.3f}"
                        for n, r in zip(left, rates.T, strict=True)]
            print(f"{column}, val {n_fractured} fractured + {n_other}: on the other {left[0]} fractured + {left[1]} "
                  f"images sensitivity {spread[0]}, specificity {spread[1]} (median, 5th-95th percentile; their "
                  f"sampling alone {sampling[0]} and {sampling[1]}); both reach the target in {both:.0%}")


if __name__ == "__main__":
    main()
