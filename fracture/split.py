"""Stratified, seeded train/val/test split that keeps byte-identical files together."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from fracture.config import SplitParams

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The included images cannot be split as asked."""


def split_manifest(manifest: pd.DataFrame, params: SplitParams) -> dict[str, pd.DataFrame]:
    """Splits the included images into train, val and test.

    Byte-identical files (same ``sha256``) form one group that goes to one split whole: the
    split is drawn over groups, stratified by label, with scikit-learn's
    ``train_test_split``, so a duplicate of a test image can never sit in training.

    Args:
        manifest: the validated manifest (``included``, ``label``, ``sha256`` columns).
        params: seed and the val and test shares.

    Returns:
        The three frames, keyed ``train``, ``val``, ``test``, each sorted by ``image_id``.

    Raises:
        SplitError: a duplicate group mixes labels, or a class is too small to stratify.
    """
    used = manifest[manifest["included"]]
    groups = used.groupby("sha256")["label"].agg(["nunique", "first"])
    mixed = groups.index[groups["nunique"] > 1]
    if len(mixed):
        ids = used.loc[used["sha256"].isin(mixed), "image_id"].tolist()
        raise SplitError(
            f"identical files carry different labels: {ids}; fix the labels or set "
            "validate.on_label_conflict: exclude"
        )
    keys = groups.index.to_numpy()
    labels = groups["first"].astype(int).to_numpy()
    try:
        rest, test = train_test_split(keys, test_size=params.test_size, stratify=labels, random_state=params.seed)
        rest_labels = groups.loc[rest, "first"].astype(int).to_numpy()
        train, val = train_test_split(
            rest,
            test_size=params.val_size / (1 - params.test_size),
            stratify=rest_labels,
            random_state=params.seed,
        )
    except ValueError as exc:
        raise SplitError(f"cannot split {len(keys)} distinct images stratified by label: {exc}") from exc
    out = {}
    for name, members in zip(SPLITS, (train, val, test), strict=True):
        out[name] = used[used["sha256"].isin(set(members))].sort_values("image_id").reset_index(drop=True)
    return out
