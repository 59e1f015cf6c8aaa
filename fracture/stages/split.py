"""The split stage: train, val and test tables from the validated manifest."""

from __future__ import annotations

from fracture.config import Params
from fracture.split import (
    Splits,
    keep_assignments,
    published_dir_of,
    read_assignments,
    split_manifest,
)
from fracture.workspace import SplitResult, Workspace


def run_split(params: Params, workspace: Workspace) -> tuple[SplitResult, Splits]:
    """Splits the included images (``split`` in params) and writes the tables and the report.

    With ``split.keep``, the images the project's ``split_assignments.csv`` names stay in the
    split it records, and once the tables are written the file records this split too (the new
    images, and any a new link moved nearer test), so that it holds the split dvc.lock records:
    DVC hashes a stage's dependencies after its command has run, and run again on that file the
    stage draws the same tables. ``splits.recorded`` says what was added (:func:`keep_assignments`).

    Returns:
        The sizes written, and the frames with the report of how they were drawn.
    """
    manifest = workspace.read_manifest()
    dataset = workspace.root / params.ingest.dest
    published = published_dir_of(dataset) if params.split.strategy == "published" else None
    assigned = read_assignments(workspace.split_assignments) if params.split.keep else None
    splits = split_manifest(manifest, params.split, published, assigned)
    result = workspace.write_split(splits, splits.report.to_dict())
    if params.split.keep:
        splits.recorded = keep_assignments(workspace.split_assignments, splits, assigned)
    return result, splits
