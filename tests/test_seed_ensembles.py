"""bench.seed_ensembles: averages of k seeds' out-of-fold probabilities, on hand-made runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bench.seed_ensembles import (
    combinations_table,
    pair_gains,
    read_runs,
    specificity_at,
)


def oof(variant: str, labels: list[int], probs: list[float]) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": variant,
        "image_id": [f"IMG{i:03d}.jpg" for i in range(len(labels))],
        "fold": [1 + i % 3 for i in range(len(labels))],
        "label": labels,
        "probability": probs,
    })


def test_specificity_is_read_at_the_highest_threshold_reaching_the_sensitivity():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05, 0.01])
    # Sensitivity 0.85 needs all four fractured images: threshold 0.2 passes 0.6 and 0.3 too.
    assert specificity_at(labels, probs) == pytest.approx(3 / 5)
    # 0.75 is reached at 0.7, above every non-fractured image.
    assert specificity_at(labels, probs, 0.75) == 1.0


def test_two_seeds_that_err_on_different_images_average_to_a_better_ranking(tmp_path):
    labels = [1, 1, 0, 0]
    # Each run misranks one pair; their mean ranks every fractured image above every other.
    a = oof("a", labels, [0.9, 0.4, 0.5, 0.1])
    b = oof("b", labels, [0.4, 0.9, 0.1, 0.5])
    c = oof("c", labels, [0.8, 0.7, 0.2, 0.3])
    path = tmp_path / "oof.csv"
    pd.concat([a, b, c]).to_csv(path, index=False)
    runs = read_runs([path])

    table = combinations_table(runs, ["a", "b", "c"], max_k=3).set_index("k")
    assert table.loc[1, "combinations"] == 3 and table.loc[2, "combinations"] == 3
    assert table.loc[1, "roc_auc_mean"] == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    mean_ab = (np.array([0.9, 0.4, 0.5, 0.1]) + np.array([0.4, 0.9, 0.1, 0.5])) / 2
    assert roc_auc_score(labels, mean_ab) == 1.0
    assert table.loc[3, "roc_auc_mean"] == 1.0

    gains = pair_gains(runs, ["a", "b", "c"]).set_index("pair")
    assert gains.loc["a+b", "over_members_mean"] == pytest.approx(0.25)
    assert gains.loc["a+b", "over_better_member"] == pytest.approx(0.25)


def test_a_variant_name_in_two_files_is_refused(tmp_path):
    labels = [1, 0]
    for name in ("one", "two"):
        oof("a", labels, [0.9, 0.1]).to_csv(tmp_path / f"{name}.csv", index=False)
    with pytest.raises(SystemExit, match="more than one oof.csv"):
        read_runs([tmp_path / "one.csv", tmp_path / "two.csv"])
