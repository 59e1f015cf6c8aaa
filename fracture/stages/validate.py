"""The validate stage: the manifest, the Great Expectations suite, the policies, the version comparison."""

from __future__ import annotations

from pathlib import Path

from fracture.config import Params
from fracture.manifest import build_manifest
from fracture.suite import rule_severities, skipped_rules
from fracture.validation import ValidationFailed, failure_message, validate
from fracture.versions import compare_with_previous
from fracture.workspace import ValidateResult, Workspace


def run_validate(params: Params, workspace: Workspace) -> ValidateResult:
    """Builds the manifest of ``ingest.dest``, runs the suite and writes the manifest and report.

    An image the served model would refuse (``serve.max_megapixels``, ``serve.min_grey_std``,
    ``serve.modalities``, ``serve.body_parts``, ``validate.min_side`` / ``max_side``, and the formats
    and bit depths it reads) is excluded under rule ``servable`` (soft as shipped: the stage goes
    on), with the served model's reason.
    The dataset is read in ``ingest.layout``'s layout; for a hospital's export (``csv``) the rules
    that only FracAtlas's files can satisfy are skipped and listed so, and the comparison with
    the previous dataset version, which reads FracAtlas's layout, is skipped too.
    The report is written before a failed hard rule is raised, so what failed can be read.

    Returns:
        The report as written.

    Raises:
        fracture.config.ConfigError: ``validate.severity`` does not name exactly the suite's rules.
        ValidationFailed: a hard rule failed; the message names the rules and offending ids.
    """
    rule_severities(params.validate)  # a params mistake fails before the manifest is built
    layout = params.ingest.layout
    manifest = build_manifest(
        workspace.root / params.ingest.dest,
        near_duplicate_threshold=params.validate.near_duplicate_threshold,
        near_duplicate_top_threshold=params.validate.near_duplicate_top_threshold,
        layout=layout,
        # What the served model refuses is not trained on (the registered model's input checks).
        max_pixels=params.serve.max_megapixels * 1_000_000,
        min_grey_std=params.serve.min_grey_std,
        modalities=params.serve.modalities,
        body_parts=params.serve.body_parts,
        min_side=params.validate.min_side,
        max_side=params.validate.max_side,
    )
    resolved, report = validate(manifest, params.validate, workspace.gx_dir, skipped_rules(layout))
    version = workspace.data_version()
    if layout != "fracatlas":
        comparison = {
            "status": "skipped",
            "message": f"the comparison with the previous dataset version reads FracAtlas's layout; "
            f"ingest.layout is {layout!r}",
        }
    elif params.validate.compare_previous:
        # ingest.dest is <the folder data.dvc tracks>/<the dataset folder inside it>.
        data_dir, *inner = Path(params.ingest.dest).parts
        comparison = compare_with_previous(
            manifest, workspace.root, data_dir, "/".join(inner), current_md5=version
        )
    else:
        comparison = {"status": "disabled", "message": "validate.compare_previous is false"}
    result = workspace.write_validate(resolved, report, version, comparison)
    if not report.success:
        low, high = params.validate.fractured_share
        allowed = {"fractured_share_in_range": f"allowed {low} to {high} (validate.fractured_share in params.yaml: "
                                               "widen it for a case mix unlike FracAtlas's)"}
        raise ValidationFailed(failure_message(report, allowed) + f"\nfull report: {workspace.validation_report}")
    return result
