"""The ingest stage: bring FracAtlas into ``ingest.dest`` (``dvc add data`` versions it afterwards)."""

from __future__ import annotations

import os

from fracture.config import Params
from fracture.ingest import SOURCE_ENV, IngestResult, ingest
from fracture.workspace import Workspace


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
