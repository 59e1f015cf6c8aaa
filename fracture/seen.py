"""What a model learnt from: the images it was trained and validated on, recorded on its MLflow run.

The train stage (and the detector's) logs the list as :data:`SEEN_ARTIFACT`; the promotion gates
read it from the champion's run and leave those test images, with every image linked to them,
out of the comparison (:mod:`fracture.gate`, :mod:`fracture.detector_registry`). A module of its
own, light to import, so that the train stage loads none of the gate's rules; like
:mod:`fracture.tracking` it is no DVC dependency of the stage (dvc.yaml's header), since it
changes what is logged on the run, not the model.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from mlflow import MlflowClient


class SeenListError(ValueError):
    """A run's list of the images its model learnt from cannot be read: empty, not a csv, or a column missing."""


#: The training run's artifact that lists the images the model was trained and validated on
#: (:meth:`SeenImages.table`). When the model is champion, a later gate leaves those images, and
#: every image linked to one of them, out of the comparison (:meth:`fracture.gate.EvaluatedSplit.seen_by`).
SEEN_ARTIFACT = "split/seen_in_training.csv"


@dataclass(frozen=True)
class SeenImages:
    """The images a model was trained or validated on, by file name and by content.

    Attributes:
        image_ids: their ``image_id``s.
        sha256: their contents' sha256 (a renamed or re-exported copy is still recognised).
    """

    image_ids: frozenset[str]
    sha256: frozenset[str]

    @staticmethod
    def table(frames: dict[str, pd.DataFrame]) -> str:
        """The train and val split tables as :data:`SEEN_ARTIFACT`'s csv: ``image_id``, ``sha256``, ``split``.

        Raises:
            KeyError: a table lacks ``image_id`` or ``sha256``.
        """
        rows = [frame[["image_id", "sha256"]].assign(split=name) for name, frame in frames.items() if name != "test"]
        return pd.concat(rows).sort_values(["split", "image_id"]).to_csv(index=False)

    @staticmethod
    def rows(text: str, where: str) -> pd.DataFrame:
        """:meth:`table`'s csv as its rows (every column as text).

        Raises:
            SeenListError: the csv is empty, cannot be parsed or lacks a column; the message names
                ``where`` it came from.
        """
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            raise SeenListError(f"{where}: not a csv of image_id and sha256 ({exc})") from exc
        if not {"image_id", "sha256"} <= set(frame.columns):
            raise SeenListError(f"{where}: columns image_id and sha256 expected, found {list(frame.columns)}")
        return frame

    @classmethod
    def from_table(cls, text: str, where: str) -> SeenImages:
        """Reads :meth:`table`'s csv.

        Raises:
            SeenListError: as :meth:`rows`.
        """
        frame = cls.rows(text, where)
        return cls(frozenset(frame["image_id"].dropna()), frozenset(frame["sha256"].dropna()))

    def among(self, image_ids: Sequence[str], sha256: Sequence[str] = (), groups: Sequence[str] = ()) -> np.ndarray | None:
        """Which of a test split's images these are, themselves or through their group
        (:meth:`fracture.gate.EvaluatedSplit.seen_by`, and the detector's test split).

        Args:
            image_ids: each image's ``image_id``; empty: the split does not know them.
            sha256: each image's content sha256, in the same order; empty: not known.
            groups: each image's group of linked images, in the same order; empty: each its own.

        Returns:
            A boolean mask in the split's order; ``None`` without image ids, as what a model saw
            cannot then be told.
        """
        if not image_ids:
            return None
        ids = np.array(image_ids, dtype=object)
        hit = np.isin(ids, list(self.image_ids))
        if sha256:
            hit |= np.isin(np.array(sha256, dtype=object), list(self.sha256 - {""}))
        linked = np.array(groups, dtype=object) if groups else ids
        return np.isin(linked, list(set(linked[hit])))


def seen_table(client: MlflowClient, run_id: str) -> str | None:
    """Run ``run_id``'s :data:`SEEN_ARTIFACT` as its csv text (:meth:`SeenImages.table`), or ``None``
    when the run did not record it; a store that cannot be read, or a run it lacks, raises."""
    folder, _, _ = SEEN_ARTIFACT.rpartition("/")
    if SEEN_ARTIFACT not in {f.path for f in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory(prefix="fracture-seen-") as tmp:
        return Path(client.download_artifacts(run_id, SEEN_ARTIFACT, tmp)).read_text()
