"""The validate stage's core: the suite's run, the policies and a summary, in one report.

:mod:`fracture.suite` holds the data-quality rules (one Great Expectations suite) and
:mod:`fracture.policies` what becomes of the images they flag; :func:`validate` runs the one,
applies the other and counts the dataset per class, body part and view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fracture.config import ValidateParams
from fracture.manifest import BODY_PARTS, UNKNOWN_PART, VIEWS, body_part
from fracture.near_duplicates import label_conflicts
from fracture.policies import Exclusion, apply_policy, duplicate_groups, label_columns
from fracture.suite import HARD, RULES, Finding, run_suite

# failure_message names at most this many offending ids per rule, and gives the reason of the first few.
MAX_IDS = 50
MAX_REASONS = 5


class ValidationFailed(RuntimeError):
    """A hard data-quality rule failed; the message names the rule and offending ids."""


@dataclass(frozen=True)
class ValidationReport:
    """What the validate stage found and decided.

    Attributes:
        success: no hard rule failed.
        findings: one per rule, in :data:`fracture.suite.RULES` order.
        excluded: image id -> the rule and reason that excluded it.
        duplicate_groups: ids of byte-identical files, two or more per group, sorted.
        counts: totals, and per class, body part and view for all ids and included images;
            ``near_duplicates``: groups, images in groups and groups whose labels disagree, the
            included truncated images that could not be compared, and the images matched on
            their thumbnails' top half only.
        gx_outputs: where the GX validation result, suite and Data Docs index were written
            (empty when no directory was given).
        near_duplicate_groups: ids of near-duplicate X-rays (:mod:`fracture.near_duplicates`),
            two or more per group, sorted; byte-identical files are among them.
    """

    success: bool
    findings: list[Finding]
    excluded: dict[str, Exclusion] = field(default_factory=dict)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    gx_outputs: dict[str, str] = field(default_factory=dict)
    near_duplicate_groups: list[list[str]] = field(default_factory=list)

    def failures(self) -> list[Finding]:
        """The hard rules that failed."""
        return [f for f in self.findings if not f.success and f.severity == HARD]

    def finding(self, rule: str) -> Finding:
        """The finding of one rule, by name."""
        for f in self.findings:
            if f.rule == rule:
                return f
        raise KeyError(f"no rule named {rule!r}; known rules: {list(RULES)}")


def _flag(frame: pd.DataFrame, column: str) -> pd.Series:
    # A csv flag as plain ints, 0 where unknown; a summary must not fail where a rule reports.
    if column not in frame:
        return pd.Series(0, index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce").fillna(0).astype(int)


def _breakdown(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per class, body part and view (a summary of the frame, not a check)."""
    label = frame["label"].astype("Int64")
    classes = {
        "fractured": int((label == 1).sum()),
        "not_fractured": int((label == 0).sum()),
    }
    other = len(frame) - sum(classes.values())
    if other:
        classes["unknown"] = other
    # Each image under its one body part, by the rule the split and evaluation use too.
    part = body_part(pd.DataFrame({p: _flag(frame, p) for p in BODY_PARTS}, index=frame.index))
    body_parts = {p: int((part == p).sum()) for p in (*BODY_PARTS, UNKNOWN_PART)}
    if not body_parts[UNKNOWN_PART]:
        del body_parts[UNKNOWN_PART]
    # Views are not exclusive (an image can show two), so an image counts under each it shows.
    views = {v: int((_flag(frame, v) == 1).sum()) for v in VIEWS}
    return {"class": classes, "body_part": body_parts, "view": views}


def validate(
    manifest: pd.DataFrame, params: ValidateParams, gx_dir: Path | None = None, skipped: dict[str, str] | None = None
) -> tuple[pd.DataFrame, ValidationReport]:
    """Runs the suite once, applies the policies and summarises the dataset.

    Args:
        manifest: the manifest.
        params: the validate section of ``params.yaml``.
        gx_dir: if given, GX's validation result, suite and Data Docs of this same run are
            written there (see :func:`fracture.suite.run_suite`).
        skipped: rules not run for this dataset's layout, each with why
            (:func:`fracture.suite.skipped_rules`); the report lists them as skipped.

    Returns:
        The manifest with labels and inclusion (:func:`fracture.policies.apply_policy`), and
        the report. The caller decides what a failed hard rule means (the CLI fails the stage
        after writing the report).

    Raises:
        ConfigError: ``validate.severity`` does not name exactly the suite's rules.
    """
    if "near_duplicate_group" in manifest:
        # A group's labels are compared as the label policy resolves them (csv first under `csv`).
        manifest = manifest.assign(
            near_duplicate_conflict=label_conflicts(manifest, label_columns(params.on_label_conflict))
        )
    run = run_suite(manifest, params, gx_dir, skipped)
    near = near_duplicate_groups(manifest)
    groups = duplicate_groups(manifest, next(f for f in run.findings if f.rule == "unique_content"))
    resolved, excluded = apply_policy(manifest, params, run.findings, groups)
    used = resolved[resolved["included"]]
    counts = {
        # Distinct: an id on two csv rows (or filed in both class folders) is one id, excluded whole, so
        # ids = included + excluded.
        "ids": int(resolved["image_id"].nunique()),
        "files": int(resolved.loc[resolved["has_file"].astype(bool), "path"].nunique()),
        "included": int(len(used)),
        "excluded": len(excluded),
        "fractured_included": int((used["label"] == 1).sum()),
        "not_fractured_included": int((used["label"] == 0).sum()),
        "all_ids": _breakdown(resolved),
        "included_images": _breakdown(used),
        "near_duplicates": _near_duplicate_counts(resolved, near),
    }
    report = ValidationReport(
        success=all(f.success for f in run.findings if f.severity == HARD),
        findings=run.findings,
        excluded=excluded,
        duplicate_groups=groups,
        counts=counts,
        gx_outputs=run.outputs,
        near_duplicate_groups=near,
    )
    return resolved, report


def near_duplicate_groups(manifest: pd.DataFrame) -> list[list[str]]:
    """The ids of each near-duplicate group of two or more images, sorted. An id on two rows
    (excluded under ``unique_image_id``) is one id, not a group of two."""
    if "near_duplicate_group" not in manifest:
        return []
    groups = manifest.groupby("near_duplicate_group")["image_id"].apply(lambda ids: sorted(set(ids)))
    return sorted(g for g in groups if len(g) > 1)


def _near_duplicate_counts(manifest: pd.DataFrame, groups: list[list[str]]) -> dict[str, Any]:
    conflict = manifest.get("near_duplicate_conflict", pd.Series(False, index=manifest.index)).astype(bool)
    conflicts = manifest.loc[conflict, "near_duplicate_group"]
    counts: dict[str, Any] = {
        "groups": len(groups),
        "images_in_groups": sum(len(g) for g in groups),
        "label_conflict_groups": int(conflicts.nunique()),
    }
    if "near_duplicate_compared" in manifest:
        # Included images the search could not look at (a truncated file that decodes less than
        # a quarter of its height): a near-duplicate of one of them would go unnoticed.
        used = manifest["included"].astype(bool) if "included" in manifest else pd.Series(True, index=manifest.index)
        decodable = manifest["decodable"].fillna(False).astype(bool)
        truncated = manifest["truncated"].fillna(False).astype(bool)
        unseen = used & decodable & truncated & ~manifest["near_duplicate_compared"].astype(bool)
        counts["not_compared"] = sorted(manifest.loc[unseen, "image_id"])
    if "near_duplicate_top_half" in manifest:
        # Images grouped only by their top halves: one of each such pair is likely corrupt below.
        counts["matched_on_top_half"] = sorted(manifest.loc[manifest["near_duplicate_top_half"].astype(bool), "image_id"])
    return counts


def failure_message(report: ValidationReport, allowed: dict[str, str] | None = None) -> str:
    """What failed, for the stage's error: one line per failed hard rule.

    Args:
        report: a report whose :meth:`ValidationReport.failures` is not empty.
        allowed: for a whole-table rule, what it allows and the setting that says so, shown
            beside what was observed (the fractured share: "allowed 0.05 to 0.5 (validate.fractured_share)").

    Returns:
        The rule and up to :data:`MAX_IDS` offending ids, quoted (or the observed value of a
        whole-table rule), per failed hard rule, each of the first :data:`MAX_REASONS` ids the rule
        excluded on a line of its own with its reason (why the file does not decode, say), then
        what to do about it.
    """
    lines = []
    for f in report.failures():
        # Quoted: an empty id reads '', not as nothing, and a space at either end shows.
        ids = ", ".join(map(repr, f.unexpected_ids[:MAX_IDS])) or (
            f"observed {f.observed}" + (f", {allowed[f.rule]}" if f.rule in (allowed or {}) else "")
        )
        more = f" and {len(f.unexpected_ids) - MAX_IDS} more" if len(f.unexpected_ids) > MAX_IDS else ""
        rows = f" for {f.unexpected_count} images" if f.unexpected_count else ""
        lines.append(f"rule '{f.rule}' failed{rows}: {ids}{more}")
        # Why each file failed, where the rule excluded it: the ids alone sent the reader to the full report.
        why = [(i, report.excluded[i].reason) for i in f.unexpected_ids
               if i in report.excluded and report.excluded[i].rule == f.rule]
        lines += [f"  {i!r}: {reason}" for i, reason in why[:MAX_REASONS]]
        if len(why) > MAX_REASONS:
            lines.append(f"  (the reasons of the other {len(why) - MAX_REASONS} under `excluded` in the full report)")
        if f.rule == "colour_mode_allowed":
            # A palette PNG, or grey or RGB with an opaque alpha channel: the served model converts
            # each to RGB and scores it (fracture.decoding.convert_for_model), and training does the same.
            lines.append("  (a mode the model converts, such as P, LA or RGBA, is taken once listed in "
                         "validate.colour_modes)")
    return (
        "data validation failed:\n  "
        + "\n  ".join(lines)
        + "\nfix the data, or set the rule to 'soft' under validate.severity in params.yaml"
    )
