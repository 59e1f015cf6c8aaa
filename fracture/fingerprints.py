"""Which images with which labels a split holds, as one hash.

The evaluate stage tags its run with the test split's fingerprint, the registry records it on
each version, and the promotion gate compares them (:mod:`fracture.gate`). Kept apart from the
gate's rules so that the evaluate stage depends on this function only, not on every rule.
"""

from __future__ import annotations

import hashlib

import pandas as pd


def split_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the sorted ``image_id<TAB>label`` lines: the same images with the same labels.

    Row order and path spelling do not matter; the image contents are covered by the data version.
    """
    lines = sorted(f"{i}\t{int(label)}" for i, label in zip(frame["image_id"], frame["label"], strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
