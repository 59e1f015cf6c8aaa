"""The split stage: train, val and test tables from the validated manifest."""

from __future__ import annotations

from fracture.config import Params
from fracture.split import Splits, published_dir_of, read_assignments, split_manifest
from fracture.workspace import SplitResult, Workspace


def run_split(params: Params, workspace: Workspace) -> tuple[SplitResult, Splits]:
    """Splits the included images (``split`` in params) and writes the tables and the report.

    With ``split.keep``, the images the project's ``split_assignments.csv`` names stay in the
    split it records.

    Returns:
        The sizes written, and the frames with the report of how they were drawn.
    """
    manifest = workspace.read_manifest()
    dataset = workspace.root / params.ingest.dest
    published = published_dir_of(dataset) if params.split.strategy == "published" else None
    assigned = read_assignments(workspace.split_assignments) if params.split.keep else None
    splits = split_manifest(manifest, params.split, published, assigned)
    return workspace.write_split(splits, splits.report.to_dict()), splits
