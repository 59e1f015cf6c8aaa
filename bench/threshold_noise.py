"""How far a threshold chosen on a validation set of a given size lands on other X-rays.

    python -m bench.threshold_noise outputs/crossval/oof.csv [--column probability] \
        [--val 85:404 --val 240:1140] [--draws 2000] [--sensitivity 0.85] [--specificity 0.85] \
        [--rule sensitivity --rule box]

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

``--rule box`` compares another way to choose the threshold on the same draws: the one whose
smaller margin over the two targets, ``min(sensitivity - 0.85, specificity - 0.85)`` on the val
set, is largest (the centre of the target rather than its sensitivity edge). A file in the long
form of ``docs/crossval-seeds-h200.csv.gz`` (a ``variant`` column, one row per variant and image)
is read as one probability column per variant; with more than one column, a closing line per
rule gives the mean over the columns of how often both parts reach the target.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binom
from sklearn.metrics import roc_curve

from fracture.evaluation import choose_threshold

RULES = ("sensitivity", "box")


def box_threshold(labels: np.ndarray, probs: np.ndarray, sensitivity: float, specificity: float) -> float:
    """The threshold whose smaller margin over the two targets on these images is largest.

    Ties go to the highest such threshold, as :func:`fracture.evaluation.choose_threshold`'s do.
    """
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    margin = np.minimum(tpr - sensitivity, (1 - fpr) - specificity)
    return float(min(thresholds[int(np.argmax(margin))], 1.0))


def held_out_rates(
    labels: np.ndarray, probs: np.ndarray, n_fractured: int, n_other: int, draws: int, sensitivity: float,
    rng: np.random.Generator, rule: str = "sensitivity", specificity: float = 0.85,
) -> np.ndarray:
    """Sensitivity and specificity (one row per draw) of the images left out of each drawn val set,
    at the threshold chosen on that set by ``rule`` (``sensitivity``: the evaluate stage's;
    ``box``: :func:`box_threshold`)."""
    if rule not in RULES:
        raise SystemExit(f"--rule {rule}: choose one of {', '.join(RULES)}")
    fractured, other = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if n_fractured >= len(fractured) or n_other >= len(other):
        raise SystemExit(f"--val {n_fractured}:{n_other} leaves no images out: the file has {len(fractured)} "
                         f"fractured and {len(other)} other images")
    rates = np.empty((draws, 2))
    for i in range(draws):
        val = np.r_[rng.choice(fractured, n_fractured, replace=False), rng.choice(other, n_other, replace=False)]
        rest = np.ones(len(labels), dtype=bool)
        rest[val] = False
        if rule == "box":
            threshold = box_threshold(labels[val], probs[val], sensitivity, specificity)
        else:
            threshold = choose_threshold(labels[val], probs[val], sensitivity)
        called = probs[rest] >= threshold
        rates[i] = called[labels[rest] == 1].mean(), (~called[labels[rest] == 0]).mean()
    return rates


def read_probabilities(path: Path) -> pd.DataFrame:
    """The file's rows, one per image, with ``label`` and the probability columns; a long file
    (``variant``, ``image_id``, ``label``, ``probability``) becomes one column per variant."""
    oof = pd.read_csv(path)
    if "label" not in oof:
        raise SystemExit(f"{path}: no label column; it has {', '.join(oof.columns)}")
    if "variant" not in oof:
        return oof
    wide = oof.pivot(index="image_id", columns="variant", values="probability")
    if wide.isna().any().any():
        missing = wide.columns[wide.isna().any()].tolist()
        raise SystemExit(f"{path}: variants {', '.join(missing)} do not score every image the others do")
    labels = oof.drop_duplicates("image_id").set_index("image_id")["label"]
    return wide.join(labels).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("oof", type=Path, help="the crossval stage's oof.csv (label and probability columns)")
    parser.add_argument("--column", action="append", default=None,
                        help="probability column(s) to read (default: probability, or every variant of a long file)")
    parser.add_argument("--val", action="append", default=None,
                        help="a val size as fractured:other (default: 85:404, the split's val, and 240:1140)")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--sensitivity", type=float, default=0.85, help="the sensitivity the threshold is chosen for")
    parser.add_argument("--specificity", type=float, default=0.85, help="the specificity the target asks beside it")
    parser.add_argument("--rule", action="append", choices=RULES, default=None,
                        help="how the threshold is chosen on each drawn val set (default: sensitivity)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    oof = read_probabilities(args.oof)
    labels = oof["label"].to_numpy()
    sizes = []
    for size in args.val or ["85:404", "240:1140"]:
        counts = size.split(":")
        if len(counts) != 2 or not all(c.isdigit() and int(c) > 0 for c in counts):
            raise SystemExit(f"--val {size}: give the val set's size as fractured:other, e.g. 85:404")
        sizes.append((int(counts[0]), int(counts[1])))
    rules = args.rule or ["sensitivity"]
    columns = args.column or ([c for c in oof.columns if c not in ("image_id", "label")] if "probability" not in oof
                              else ["probability"])
    print(f"{args.oof}: {len(oof)} images, {int(labels.sum())} fractured; {args.draws} draws per val size; "
          f"threshold: {' / '.join(rules)} (sensitivity: the highest reaching {args.sensitivity} on the drawn val set; "
          f"box: the largest smaller margin over {args.sensitivity} and {args.specificity})")
    passed = {(rule, size): [] for rule in rules for size in sizes}
    for column in columns:
        if column not in oof:
            raise SystemExit(f"{args.oof}: no column {column!r}; it has {', '.join(oof.columns)}")
        for n_fractured, n_other in sizes:
            for rule in rules:
                rng = np.random.default_rng(args.seed)  # the same draws for every column, size and rule
                rates = held_out_rates(labels, oof[column].to_numpy(), n_fractured, n_other, args.draws,
                                       args.sensitivity, rng, rule, args.specificity)
                spread = [f"{np.median(r):.3f} ({np.quantile(r, 0.05):.3f}-{np.quantile(r, 0.95):.3f})"
                          for r in rates.T]
                both = ((rates[:, 0] >= args.sensitivity) & (rates[:, 1] >= args.specificity)).mean()
                passed[rule, (n_fractured, n_other)].append(both)
                left = (int(labels.sum()) - n_fractured, int((labels == 0).sum()) - n_other)
                sampling = [f"{binom.ppf(0.05, n, np.median(r)) / n:.3f}-{binom.ppf(0.95, n, np.median(r)) / n:.3f}"
                            for n, r in zip(left, rates.T, strict=True)]
                print(f"{column}, {rule}, val {n_fractured} fractured + {n_other}: on the other {left[0]} fractured + "
                      f"{left[1]} images sensitivity {spread[0]}, specificity {spread[1]} (median, 5th-95th "
                      f"percentile; their sampling alone {sampling[0]} and {sampling[1]}); both reach the target "
                      f"in {both:.1%}")
    if len(columns) > 1:
        for (rule, (n_fractured, n_other)), shares in passed.items():
            first = passed[rules[0], (n_fractured, n_other)]
            at_least = sum(s >= f for s, f in zip(shares, first, strict=True))
            print(f"{rule}, val {n_fractured} + {n_other}: both parts reach the target in {np.mean(shares):.1%} of the "
                  f"draws, mean over {len(columns)} columns; at least {rules[0]}'s in {at_least} of them")


if __name__ == "__main__":
    main()
