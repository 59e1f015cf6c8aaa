"""Data-quality rules on the manifest, as a Great Expectations suite, and the label policy.

Hard rules fail the validate stage; soft rules are reported and resolved by the policy in
``params.yaml`` (``validate.on_truncated``, ``validate.on_label_conflict``). Every image the
policy excludes is listed in the report with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from fracture.config import ValidateParams

log = logging.getLogger(__name__)

HARD = "critical"
SOFT = "warning"
MAX_IDS = 50


class ValidationFailed(RuntimeError):
    """A hard data-quality rule failed; the message names the rule and offending ids."""


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    success: bool
    unexpected_count: int
    unexpected_ids: list[str]
    observed: Any = None


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    findings: list[Finding]
    excluded: dict[str, str] = field(default_factory=dict)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.success and f.severity == HARD]


def build_suite(params: ValidateParams) -> list[tuple[str, gxe.Expectation]]:
    """The expectations run on every manifest, each with a short rule name.

    Args:
        params: bounds and allowed values.

    Returns:
        ``(rule name, expectation)`` pairs; the expectation's ``severity`` marks it hard or soft.
    """
    low, high = params.fractured_share
    return [
        ("unique_image_id", gxe.ExpectColumnValuesToBeUnique(column="image_id", severity=HARD)),
        ("file_for_every_csv_row", gxe.ExpectColumnValuesToBeInSet(column="has_file", value_set=[True], severity=HARD)),
        ("csv_row_for_every_file", gxe.ExpectColumnValuesToBeInSet(column="in_csv", value_set=[True], severity=HARD)),
        ("folder_label_binary", gxe.ExpectColumnValuesToBeInSet(column="folder_label", value_set=[0, 1], severity=HARD)),
        ("csv_label_binary", gxe.ExpectColumnValuesToBeInSet(column="csv_label", value_set=[0, 1], severity=HARD)),
        ("decodable", gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], severity=HARD)),
        ("width_in_bounds", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_side, max_value=params.max_side, severity=HARD)),
        ("height_in_bounds", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_side, max_value=params.max_side, severity=HARD)),
        ("colour_mode_allowed", gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(params.colour_modes), severity=HARD)),
        ("fractured_share_in_range", gxe.ExpectColumnMeanToBeBetween(column="folder_label", min_value=low, max_value=high, severity=HARD)),
        ("folder_label_matches_csv", gxe.ExpectColumnPairValuesToBeEqual(column_A="folder_label", column_B="csv_label", severity=SOFT)),
        ("not_truncated", gxe.ExpectColumnValuesToBeInSet(column="truncated", value_set=[False], severity=SOFT)),
        ("unique_content", gxe.ExpectColumnValuesToBeUnique(column="sha256", severity=SOFT)),
    ]


def run_suite(manifest: pd.DataFrame, params: ValidateParams) -> list[Finding]:
    """Runs the suite on the manifest with Great Expectations and collects offending ids.

    Args:
        manifest: the frame from :func:`fracture.manifest.build_manifest`.
        params: bounds and allowed values.

    Returns:
        One finding per rule.
    """
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("fracatlas")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": _for_gx(manifest)})
    )
    findings = []
    for rule, expectation in build_suite(params):
        result = batch.validate(
            expectation,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["image_id"]},
        )
        details = result.result or {}
        ids = sorted({str(r["image_id"]) for r in details.get("unexpected_index_list") or [] if isinstance(r, dict)})
        findings.append(
            Finding(
                rule=rule,
                severity=str(expectation.severity.value if hasattr(expectation.severity, "value") else expectation.severity),
                success=bool(result.success),
                unexpected_count=int(details.get("unexpected_count") or len(ids)),
                unexpected_ids=ids,
                observed=_jsonable(details.get("observed_value")),
            )
        )
    return findings


def _for_gx(manifest: pd.DataFrame) -> pd.DataFrame:
    # GX compares with plain Python values; nullable extension dtypes become object columns
    # with None for missing values.
    out = manifest.copy()
    for col in out.columns:
        if isinstance(out[col].dtype, pd.api.extensions.ExtensionDtype):
            out[col] = out[col].astype(object).where(out[col].notna(), None)
    return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def duplicate_groups(manifest: pd.DataFrame) -> list[list[str]]:
    """Groups of image ids whose files are byte-identical (same sha256), two or more each."""
    with_file = manifest[manifest["has_file"]]
    groups = with_file.groupby("sha256")["image_id"].apply(sorted)
    return sorted(g for g in groups if len(g) > 1)


def apply_policy(manifest: pd.DataFrame, params: ValidateParams) -> tuple[pd.DataFrame, dict[str, str]]:
    """Resolves each image's training label and whether it is used, per ``params.yaml``.

    Args:
        manifest: the manifest.
        params: ``on_truncated`` and ``on_label_conflict``.

    Returns:
        The manifest with ``label``, ``included`` and ``exclude_reason`` columns, and the
        excluded ids with their reasons.
    """
    out = manifest.copy()
    reasons = pd.Series("", index=out.index, dtype=object)
    conflict = out["folder_label"].notna() & out["csv_label"].notna() & (out["folder_label"] != out["csv_label"])
    if params.on_label_conflict == "csv":
        out["label"] = out["csv_label"].fillna(out["folder_label"])
    else:
        out["label"] = out["folder_label"].fillna(out["csv_label"])
    if params.on_label_conflict == "exclude":
        reasons[conflict] = "folder_label_matches_csv: folder and dataset.csv labels differ"
    if params.on_truncated == "exclude":
        reasons[out["truncated"].fillna(False) & (reasons == "")] = "not_truncated: file ends before the JPEG end marker"
    reasons[~out["has_file"]] = "file_for_every_csv_row: no image file"
    reasons[out["decodable"].eq(False).fillna(False)] = "decodable: image cannot be decoded"
    out["exclude_reason"] = reasons
    out["included"] = reasons == ""
    excluded = dict(zip(out.loc[~out["included"], "image_id"], out.loc[~out["included"], "exclude_reason"], strict=True))
    return out, excluded


def validate(manifest: pd.DataFrame, params: ValidateParams) -> tuple[pd.DataFrame, ValidationReport]:
    """Runs the suite, applies the label policy and summarises the dataset.

    Args:
        manifest: the manifest.
        params: the validate section of ``params.yaml``.

    Returns:
        The manifest with labels and inclusion, and the report. The caller decides what a
        failed hard rule means (the CLI fails the stage after writing the report).
    """
    findings = run_suite(manifest, params)
    resolved, excluded = apply_policy(manifest, params)
    used = resolved[resolved["included"]]
    counts = {
        "ids": int(len(resolved)),
        "files": int(resolved["has_file"].sum()),
        "included": int(len(used)),
        "excluded": len(excluded),
        "fractured_included": int((used["label"] == 1).sum()),
        "not_fractured_included": int((used["label"] == 0).sum()),
    }
    report = ValidationReport(
        success=all(f.success for f in findings if f.severity == HARD),
        findings=findings,
        excluded=excluded,
        duplicate_groups=duplicate_groups(manifest),
        counts=counts,
    )
    return resolved, report


def failure_message(report: ValidationReport) -> str:
    """One line per failed hard rule, naming the rule and up to 50 offending ids."""
    lines = []
    for f in report.failures():
        ids = ", ".join(f.unexpected_ids[:MAX_IDS]) or f"observed {f.observed}"
        more = f" and {len(f.unexpected_ids) - MAX_IDS} more" if len(f.unexpected_ids) > MAX_IDS else ""
        lines.append(f"rule '{f.rule}' failed for {f.unexpected_count or ''} rows: {ids}{more}")
    return "data validation failed:\n  " + "\n  ".join(lines)
