"""The policies: what happens to the images the suite flags, per ``params.yaml``.

The policies act on the ids GX flags (:func:`fracture.suite.run_suite`), whatever the rule's
severity:

* ``on_truncated``: ``keep`` (loaded with truncated loading allowed) or ``exclude``;
* ``on_label_conflict``: ``folder`` or ``csv`` (which label wins) or ``exclude``;
* ``on_duplicate``: ``grouped`` (every copy kept; the split keeps a group together) or
  ``keep_one`` (the first id of each byte-identical group is kept, the others excluded);
* ``on_near_duplicate_conflict``: ``exclude`` (every member of a near-duplicate group whose
  labels disagree is left out: one radiograph cannot be both) or ``keep`` (each keeps its own
  label; the split still keeps the group together).

Images that cannot be used at all are excluded whatever the severity: an id on more than one
row (``unique_image_id``: the split, the groups and the exclusions are keyed by id, and which
file the id's label belongs to cannot be told, so every row of it is left out), no file, a file
that does not decode (``decodable``), a file the served model refuses for what it is
(``servable``: another body part or modality, FOR PROCESSING, a blank picture, ..., with the
served model's reason; soft as shipped, so one chest X-ray in a PACS export is left out
without failing the stage), or a label that is not 0 or 1; in that order of precedence, ahead of every
policy above. Soft findings of the other rules (sizes, colour modes, body-part flags,
``fracture_count``) are reported and the images kept. Every excluded image is listed in the
report with the rule and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd

from fracture.config import ValidateParams
from fracture.suite import Finding


@dataclass(frozen=True)
class Exclusion:
    """Why one image is left out of training and evaluation."""

    rule: str
    reason: str


def duplicate_groups(manifest: pd.DataFrame, finding: Finding) -> list[list[str]]:
    """The byte-identical files among the ids the ``unique_content`` rule flagged.

    Args:
        manifest: the manifest the suite ran on (``image_id`` and ``sha256``).
        finding: that run's ``unique_content`` finding.

    Returns:
        The flagged ids grouped by ``sha256``, each group sorted and of two or more ids, the
        groups sorted.
    """
    flagged = manifest[manifest["image_id"].isin(finding.unexpected_ids)]
    # Distinct ids: one file named on two csv rows is a repeated id (its own rule), not two copies.
    groups = flagged.groupby("sha256")["image_id"].apply(lambda ids: sorted(set(ids)))
    return sorted(g for g in groups if len(g) > 1)


def repeated_id_reason(rows: pd.DataFrame) -> str:
    """Why the rows of one repeated image id are all excluded, naming where each row comes from.

    Args:
        rows: the manifest's rows of that id (``path``: empty where only the csv names it).

    Returns:
        The files (or csv rows without a file) sharing the id, and what to do.
    """
    paths = rows["path"].fillna("").astype(str).tolist() if "path" in rows else [""] * len(rows)
    files = sorted({p for p in paths if p})
    where = [f"{p} (on {paths.count(p)} rows)" if paths.count(p) > 1 else p for p in files]
    if "" in paths:
        where.append(f"{paths.count('')} csv row(s) without a file")
    if len(files) > 1:
        todo = "rename one of the files (and give it its own csv row), or remove the copy"
    else:
        todo = "remove the repeated row from the csv (dataset.csv, or labels.csv)"
    return (
        f"its id is on {len(paths)} rows ({'; '.join(where)}): which file its label, split and exclusions belong "
        f"to cannot be told, so every row of it is left out whatever unique_image_id's severity; {todo}"
    )


def label_columns(on_label_conflict: str) -> tuple[str, str]:
    """The manifest's label column an image's label comes from where both exist, then the one
    that fills in where only it exists (``validate.on_label_conflict``: ``csv`` puts dataset.csv's first)."""
    return ("csv_label", "folder_label") if on_label_conflict == "csv" else ("folder_label", "csv_label")


def apply_policy(
    manifest: pd.DataFrame, params: ValidateParams, findings: list[Finding], duplicates: list[list[str]]
) -> tuple[pd.DataFrame, dict[str, Exclusion]]:
    """Resolves each image's training label and whether it is used, per ``params.yaml``.

    Acts on the ids the suite flagged; see the module docstring for the policies.

    Args:
        manifest: the manifest.
        params: ``on_truncated``, ``on_label_conflict``, ``on_duplicate`` and
            ``on_near_duplicate_conflict``.
        findings: the suite's findings on this manifest (:func:`fracture.suite.run_suite`).
        duplicates: the byte-identical groups among them (:func:`duplicate_groups`).

    Returns:
        The manifest with ``label``, ``label_source``, ``included``, ``exclude_rule`` and
        ``exclude_reason`` columns, and the excluded ids with their rule and reason.
    """
    flagged = {f.rule: set(f.unexpected_ids) for f in findings}
    out = manifest.copy()
    # The policy's label wins where both exist; the other fills in where only it exists.
    first, second = label_columns(params.on_label_conflict)
    out["label"] = out[first].fillna(out[second])
    out["label_source"] = out[first].notna().map({True: first, False: second}).str.removesuffix("_label")
    out.loc[out["label"].isna(), "label_source"] = ""

    excluded: dict[str, Exclusion] = {}

    def exclude(ids: Iterable[str], rule: str, reason: str | Callable[[str], str]) -> None:
        # The first reason found wins, so the order below sets the precedence.
        for image_id in ids:
            if image_id not in excluded:
                excluded[image_id] = Exclusion(rule, reason(image_id) if callable(reason) else reason)

    rows = out.drop_duplicates("image_id").set_index("image_id")  # ids may repeat (unique_image_id)
    # An id on two rows first: excluded by id, both rows go, and no later rule (a near-duplicate
    # conflict between its two files, say) names it. Read from the manifest itself, so it holds
    # whatever the suite ran.
    repeated = out[out["image_id"].duplicated(keep=False)]
    exclude(
        sorted(repeated["image_id"].unique()),
        "unique_image_id",
        lambda i: repeated_id_reason(repeated[repeated["image_id"] == i]),
    )
    exclude(
        sorted(flagged["file_for_every_csv_row"]),
        "file_for_every_csv_row",
        "the csv (dataset.csv, or labels.csv) lists it, but no image file exists",
    )
    exclude(
        sorted(flagged["decodable"]),
        "decodable",
        lambda i: f"the file does not decode as an image: {rows.at[i, 'error']}",
    )
    exclude(
        sorted(flagged["servable"]),
        "servable",
        lambda i: f"the served model refuses the file, so it is not trained on: {rows.at[i, 'error']}",
    )
    for source in ("folder", "csv"):
        bad = sorted(i for i in flagged[f"{source}_label_binary"] if rows.at[i, "label_source"] == source)
        exclude(bad, f"{source}_label_binary", lambda i: f"its label {rows.at[i, 'label']} is not 0 or 1")
    # GX's value-set rules pass empty values, so a file no label reaches (no class folder, and no
    # csv row when that rule is soft) is excluded here rather than trained on as label <NA>.
    exclude(
        sorted(out.loc[out["label"].isna(), "image_id"].unique()),
        "csv_row_for_every_file",
        "it has no label: no class folder gives one, and no csv row lists it",
    )
    if params.on_label_conflict == "exclude":
        exclude(
            sorted(flagged["folder_label_matches_csv"]),
            "folder_label_matches_csv",
            lambda i: f"folder label {rows.at[i, 'folder_label']} and dataset.csv label "
            f"{rows.at[i, 'csv_label']} differ (validate.on_label_conflict: exclude)",
        )
    if params.on_truncated == "exclude":
        exclude(
            sorted(flagged["not_truncated"]),
            "not_truncated",
            "the file ends before the JPEG end-of-image marker (validate.on_truncated: exclude)",
        )
    if params.on_near_duplicate_conflict == "exclude":
        exclude(
            sorted(flagged["near_duplicate_labels_agree"]),
            "near_duplicate_labels_agree",
            lambda i: f"a near-duplicate of another X-ray in group {rows.at[i, 'near_duplicate_group']} that carries "
            "a different label (validate.on_near_duplicate_conflict: exclude)",
        )
    if params.on_duplicate == "keep_one":
        for group in duplicates:
            remaining = [i for i in group if i not in excluded]
            if len(remaining) > 1:
                kept = remaining[0]
                exclude(
                    remaining[1:],
                    "unique_content",
                    f"byte-identical to {kept}, which is kept (validate.on_duplicate: keep_one)",
                )

    out["exclude_rule"] = out["image_id"].map(lambda i: excluded[i].rule if i in excluded else "")
    out["exclude_reason"] = out["image_id"].map(lambda i: excluded[i].reason if i in excluded else "")
    out["included"] = ~out["image_id"].isin(excluded)
    return out, dict(sorted(excluded.items()))
