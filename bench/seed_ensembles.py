"""What averaging k training seeds buys over one network, read from cross-validation sweeps.

    python -m bench.seed_ensembles sweep/oof.csv [more/oof.csv ...] \
        --group "448=s42-448,s43-448,s44-448" --group "512=s42-512,s43-512" [--max-k 3]

Reads ``bench/crossval_sweep.py``'s ``oof.csv`` files (variant, image, fold, label, the last
epoch's held-out probability). Each ``--group`` names runs of one recipe that differ only in
``train.seed``. For every k up to ``--max-k``, every combination of k of the group's runs is
averaged image by image (the mean of probabilities: what ``profiles.<p>.members: k`` serves,
whose member j trains exactly as a run with seed ``train.seed + j - 1``), and its out-of-fold
ROC AUC and specificity at sensitivity 0.85 are computed. The table gives, per k, the mean,
standard deviation and range over the combinations: k = 1 is the seed-to-seed spread of one
network, the figure any single recipe comparison has to beat.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import recall_score, roc_auc_score

from fracture.evaluation import choose_threshold

SENSITIVITY = 0.85


def specificity_at(labels: np.ndarray, probs: np.ndarray, sensitivity: float = SENSITIVITY) -> float:
    """Specificity at the highest threshold whose sensitivity reaches ``sensitivity`` on these
    predictions: the rule the evaluate stage and cross-validation pick their threshold by."""
    threshold = choose_threshold(labels, probs, sensitivity)
    return float(recall_score(labels, probs >= threshold, pos_label=0, zero_division=0))


def read_runs(paths: list[Path]) -> pd.DataFrame:
    """One column of probabilities per variant, indexed by image; ``label`` beside them."""
    oof = pd.concat([pd.read_csv(p) for p in paths])
    if oof.duplicated(["variant", "image_id"]).any():
        raise SystemExit("a variant name appears in more than one oof.csv: give each run its own name")
    wide = oof.pivot(index="image_id", columns="variant", values="probability")
    labels = oof.drop_duplicates("image_id").set_index("image_id")["label"].astype(int)
    return wide.assign(label=labels.reindex(wide.index))


def parse_group(text: str) -> tuple[str, list[str]]:
    name, sep, runs = text.partition("=")
    if not sep or not runs:
        raise SystemExit(f"--group {text!r}: expected NAME=variant,variant,...")
    return name, runs.split(",")


def combinations_table(runs: pd.DataFrame, group: list[str], max_k: int) -> pd.DataFrame:
    labels = runs["label"].to_numpy()
    rows = []
    for k in range(1, min(max_k, len(group)) + 1):
        aucs, specs = [], []
        for combo in itertools.combinations(group, k):
            probs = runs[list(combo)].mean(axis=1).to_numpy()
            aucs.append(roc_auc_score(labels, probs))
            specs.append(specificity_at(labels, probs))
        rows.append({
            "k": k,
            "combinations": len(aucs),
            "roc_auc_mean": np.mean(aucs),
            "roc_auc_sd": np.std(aucs, ddof=1) if len(aucs) > 1 else float("nan"),
            "roc_auc_min": np.min(aucs),
            "roc_auc_max": np.max(aucs),
            "spec_at_sens_mean": np.mean(specs),
            "spec_at_sens_min": np.min(specs),
            "spec_at_sens_max": np.max(specs),
        })
    return pd.DataFrame(rows)


def pair_gains(runs: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Each pair's AUC against its own two members' mean and their better one."""
    labels = runs["label"].to_numpy()
    single = {v: roc_auc_score(labels, runs[v]) for v in group}
    rows = []
    for a, b in itertools.combinations(group, 2):
        pair = roc_auc_score(labels, runs[[a, b]].mean(axis=1))
        rows.append({"pair": f"{a}+{b}", "roc_auc": pair,
                     "over_members_mean": pair - (single[a] + single[b]) / 2,
                     "over_better_member": pair - max(single[a], single[b])})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("oof", nargs="+", type=Path)
    parser.add_argument("--group", action="append", required=True, help="NAME=variant,variant,... (one recipe, several seeds)")
    parser.add_argument("--max-k", type=int, default=3)
    args = parser.parse_args()
    runs = read_runs(args.oof)
    pd.set_option("display.width", 160)
    for name, group in map(parse_group, args.group):
        missing = [v for v in group if v not in runs.columns]
        if missing:
            raise SystemExit(f"group {name}: no runs named {', '.join(missing)} in {', '.join(map(str, args.oof))}")
        if len(group) < 2:
            raise SystemExit(f"group {name}: name at least two runs (seeds) of the recipe")
        if runs[group].isna().any().any():
            raise SystemExit(f"group {name}: the runs did not score the same images")
        n, fractured = len(runs), int(runs["label"].sum())
        print(f"\n{name}: {len(group)} seeds, {n} out-of-fold images ({fractured} fractured)")
        print(combinations_table(runs, group, args.max_k).round(4).to_string(index=False))
        gains = pair_gains(runs, group)
        print(f"pairs: over their members' mean {gains['over_members_mean'].mean():+.4f} "
              f"(range {gains['over_members_mean'].min():+.4f} to {gains['over_members_mean'].max():+.4f}); "
              f"over the better member {gains['over_better_member'].mean():+.4f}, "
              f"higher than both members in {int((gains['over_better_member'] > 0).sum())} of {len(gains)}")


if __name__ == "__main__":
    main()
