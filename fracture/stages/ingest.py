"""The ingest stage: bring FracAtlas into ``ingest.dest`` (``dvc add data`` versions it afterwards)."""

from __future__ import annotations

import os

from fracture.config import Params
from fracture.ingest import SOURCE_ENV, IngestResult, ingest
from fracture.split import keep_assignments
from fracture.workspace import ASSIGNMENTS_FILE, SPLITS, Workspace


def run_ingest(params: Params, workspace: Workspace, source: str | None = None) -> IngestResult:
    """Copies, unpacks or downloads FracAtlas into the project.

    Args:
        params: ``ingest`` names the destination and the figshare article.
        workspace: the project.
        source: a FracAtlas folder or zip; ``None`` uses ``$FRACATLAS_SOURCE``, else figshare.

    Returns:
        What was ingested, from where, and how many checksums were verified.

    Raises:
        fracture.ingest.DownloadError: a transient download failure (worth a retry).
        fracture.ingest.IngestError: any other failure (a wrong path, a bad layout, a checksum).
    """
    return ingest(params.ingest, workspace.root / params.ingest.dest, source or os.environ.get(SOURCE_ENV) or None)


def record_split(params: Params, workspace: Workspace) -> str | None:
    """Records the project's split in ``split_assignments.csv`` before new data replaces its data.

    With ``split.keep``, the split stage then leaves every image it names where it was, and draws
    only the new ones (:func:`fracture.split.split_manifest`). Images it names already keep their
    row, unless the last split put them nearer test.

    Returns:
        What was recorded, or a warning when dvc.lock records a split that ``outputs/split/`` does
        not hold (a new clone not pulled); ``None`` when there was nothing to say.
    """
    if not params.split.keep:
        return None
    tables = [workspace.split_table(name) for name in SPLITS]
    if not all(table.is_file() for table in tables):
        lock = workspace.root / "dvc.lock"
        if lock.is_file() and "outputs/split/test.csv" in lock.read_text():
            return (
                "warning: dvc.lock records a split that outputs/split/ does not hold, so the images it placed "
                f"are not recorded in {ASSIGNMENTS_FILE} and may change split; `dvc pull outputs/split` "
                "before ingesting keeps them where they were"
            )
        return None
    added, nearer, total = keep_assignments(workspace.split_assignments, workspace.read_split_tables())
    if not added and not nearer:
        return None
    moved = f" and moved {nearer} nearer test, where the last split put them," if nearer else ""
    return (
        f"recorded the split of {added} more images{moved} in {ASSIGNMENTS_FILE} ({total} in all): they keep it "
        "when the new data is split; commit it with dvc.lock"
    )
