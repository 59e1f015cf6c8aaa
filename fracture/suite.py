"""The data-quality rules on the manifest, as two Great Expectations suites, and their run.

Every rule is one or more GX expectations. ``params.yaml``'s ``validate.severity`` makes each
rule hard (a failure fails the validate stage) or soft (reported, then resolved by a policy,
see :mod:`fracture.policies`), and the rules go into two suites by severity:
``hard_rules_fail_the_validate_stage`` and ``soft_rules_reported_and_handled_by_policies``
(:data:`SUITE_NAMES`). Both run once through one GX
Checkpoint; the findings, the saved GX validation results and the Data Docs all come from
that one run. The Data Docs list the two apart, so their status says what the stage decided:
the hard suite fails exactly when the stage fails, and a failed soft suite means images were
flagged and handled by a policy.

What the real FracAtlas copy shows, and the rules follow:

* ``fracture_count`` agrees with the folder label on every image and with dataset.csv's
  ``fractured`` on all but IMG0003298 (csv 0, count 1, in images/Fractured). So
  ``fracture_count_matches_label`` checks dataset.csv against itself (``fractured`` vs
  ``fracture_count``); together with ``folder_label_matches_csv`` this also covers the folder
  label, and a failure shows which of the three sources is the odd one out. A fractured image
  needs its count: GX's value checks pass an empty cell, so a not-null check says so.
* ``mixed`` is not a fifth exclusive body part: a ``mixed`` image also has two or three of
  hand, leg, hip and shoulder set. So ``body_part_flags_valid`` expects exactly one of the four
  when ``mixed`` is 0 and at least two when it is 1, on a derived ``body_part_count`` column.
  It also holds every flag column of dataset.csv (:data:`fracture.manifest.FLAG_COLUMNS`:
  ``hardware``, ``multiscan`` and the views too) to 0 or 1: ``validate.severity`` names rules,
  and a rule of its own per flag would need a name params.yaml does not have.

A hospital's own export (``ingest.layout: csv``, :mod:`fracture.manifest`) has no class folders
and no FracAtlas columns: the rules of :data:`FRACATLAS_ONLY` are not run on it, and their
findings say they were skipped and why.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.core import ExpectationSuiteValidationResult
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.metadata_types import FailureSeverity
from great_expectations.expectations.row_conditions import Column

from fracture.config import ConfigError, ValidateParams
from fracture.docs_assets import make_offline
from fracture.manifest import FLAG_COLUMNS, LABELS_CSV, REGIONS
from fracture.vocabulary import Layout

log = logging.getLogger(__name__)

HARD = "hard"
SOFT = "soft"
# How params.yaml's severities read in GX's own vocabulary (shown in the result and Data Docs).
GX_SEVERITY = {HARD: FailureSeverity.CRITICAL, SOFT: FailureSeverity.WARNING}

#: What the Data Docs show as each suite's name: it says what a failure of that suite means.
SUITE_NAMES = {HARD: "hard_rules_fail_the_validate_stage", SOFT: "soft_rules_reported_and_handled_by_policies"}
SUITE_NOTES = {
    HARD: "Hard rules: a failure here fails the validate stage (validate.severity in params.yaml).",
    SOFT: "Soft rules: images flagged here are reported and handled by the policies in params.yaml "
    "(validate.on_truncated, on_label_conflict, on_duplicate, on_near_duplicate_conflict); they do not "
    "fail the validate stage. The stage's report (outputs/validate/report.json) lists every excluded image.",
}
RUN_NAME = "validate"
#: GX's validation result and suite per severity: ``validation_result.hard.json`` and so on.
RESULT_FILE = "validation_result.{}.json"
SUITE_FILE = "expectation_suite.{}.json"
DOCS_DIR = "data_docs"
DOCS_SITE = "fracture"

# Derived for body_part_flags_valid: how many of the regions a row sets (see the docstring).
BODY_PART_COUNT = "body_part_count"
# Derived for fractured_share_in_range: the class folder's label, else the csv's (the csv layout
# has no class folders).
GIVEN_LABEL = "given_label"

# Every rule the suite knows, in the order the report lists them; validate.severity must name
# each of them exactly.
RULES = (
    "unique_image_id",
    "file_for_every_csv_row",
    "csv_row_for_every_file",
    "folder_label_binary",
    "csv_label_binary",
    "decodable",
    "servable",
    "width_in_bounds",
    "height_in_bounds",
    "colour_mode_allowed",
    "body_part_flags_valid",
    "fractured_share_in_range",
    "folder_label_matches_csv",
    "fracture_count_matches_label",
    "not_truncated",
    "unique_content",
    "near_duplicate_labels_agree",
)

#: Rules that check what only FracAtlas's own files hold, with why each is skipped for the csv
#: layout (a hospital's export: images/ and labels.csv). They are not run there, and the report
#: lists them as skipped.
FRACATLAS_ONLY = {
    "folder_label_binary": "no class folders in the csv layout: the label comes from labels.csv alone",
    "folder_label_matches_csv": "no class folders in the csv layout: labels.csv is the only label",
    "fracture_count_matches_label": "fracture_count is a column of FracAtlas's dataset.csv; labels.csv has none",
    "body_part_flags_valid": (
        "FracAtlas's dataset.csv flag columns (body parts, hardware, multiscan, views); labels.csv's body_part "
        "and view columns are checked when it is read"
    ),
}


def skipped_rules(layout: Layout) -> dict[str, str]:
    """The rules not run for ``ingest.layout``, each with why (empty for FracAtlas)."""
    return {} if layout == "fracatlas" else dict(FRACATLAS_ONLY)


@dataclass(frozen=True)
class Finding:
    """The outcome of one rule (all of its expectations together).

    Attributes:
        rule: the rule name, a key of ``validate.severity``.
        severity: ``hard`` or ``soft``.
        success: whether every expectation of the rule passed.
        unexpected_count: how many distinct image ids the rule flags.
        unexpected_ids: those ids, sorted.
        observed: the observed value of a whole-table expectation (e.g. the fractured share).
        skipped: why the rule was not run for this dataset's layout (empty: it was run).
    """

    rule: str
    severity: str
    success: bool
    unexpected_count: int
    unexpected_ids: list[str]
    observed: Any = None
    skipped: str = ""


def rule_severities(params: ValidateParams) -> dict[str, str]:
    """Checks ``validate.severity`` against the suite's rules.

    Cheap and independent of the data, so an entry point can call it before building the
    manifest and fail in a second instead of after the decode.

    Args:
        params: the validate section of ``params.yaml``.

    Returns:
        Rule name -> ``hard`` or ``soft``, in :data:`RULES` order.

    Raises:
        ConfigError: a rule is missing from the mapping, the mapping names an unknown rule, or
            a value is neither ``hard`` nor ``soft``.
    """
    given = dict(params.severity or {})
    known = f"known rules: {', '.join(RULES)}"
    missing = [r for r in RULES if r not in given]
    if missing:
        raise ConfigError(
            f"params.yaml: validate.severity lacks {missing}; give every rule 'hard' or 'soft' ({known})"
        )
    unknown = sorted(set(given) - set(RULES))
    if unknown:
        raise ConfigError(
            f"params.yaml: validate.severity names unknown rules {unknown}; remove or rename them ({known})"
        )
    bad = {r: v for r, v in given.items() if v not in GX_SEVERITY}
    if bad:
        raise ConfigError(f"params.yaml: validate.severity values must be 'hard' or 'soft', got {bad}")
    return {r: given[r] for r in RULES}


def _rule_expectations(params: ValidateParams) -> dict[str, list[tuple[str, gxe.Expectation]]]:
    """Rule name -> its expectations, each with what it checks in words, for every rule."""
    low, high = params.fractured_share
    lo, hi = params.min_side, params.max_side
    modes = list(params.colour_modes)
    return {
        "unique_image_id": [
            ("every image id appears once", gxe.ExpectColumnValuesToBeUnique(column="image_id")),
        ],
        "file_for_every_csv_row": [
            (f"every row of the csv (dataset.csv, or {LABELS_CSV}) has an image file",
             gxe.ExpectColumnValuesToBeInSet(column="has_file", value_set=[True])),
        ],
        "csv_row_for_every_file": [
            (f"every image file has a row in the csv (dataset.csv, or {LABELS_CSV})",
             gxe.ExpectColumnValuesToBeInSet(column="in_csv", value_set=[True])),
        ],
        "folder_label_binary": [
            ("the class folder gives label 0 or 1",
             gxe.ExpectColumnValuesToBeInSet(column="folder_label", value_set=[0, 1])),
        ],
        "csv_label_binary": [
            (f"the csv's label is 0 or 1 (dataset.csv's fractured, or {LABELS_CSV}'s label)",
             gxe.ExpectColumnValuesToBeInSet(column="csv_label", value_set=[0, 1])),
            # The check above passes an empty cell, as GX's value checks do: a row the csv has
            # must give a label (a file it lacks is csv_row_for_every_file's).
            ("every row the csv has gives a label",
             gxe.ExpectColumnValuesToNotBeNull(column="csv_label", row_condition=Column("in_csv") == True)),  # noqa: E712
        ],
        "decodable": [
            # A file the served model refuses for what it is (a chest, a CT, a blank film) is no
            # damaged file: `servable` lists it, and a PACS export's stray chest does not fail the stage.
            ("every file decodes as an image (of those the served model does not refuse for what they are)",
             gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True],
                                             row_condition=Column("refused") == False)),  # noqa: E712
        ],
        "servable": [
            ("no file is one the served model refuses (another body part or modality, FOR PROCESSING, several "
             "frames, a format or bit depth it does not read, too many pixels, a side out of bounds, a blank picture)",
             gxe.ExpectColumnValuesToBeInSet(column="refused", value_set=[False])),
        ],
        # Of the files that decode, as colour_mode_allowed: a file left out under `servable` (the
        # served model refuses it) is not counted again here.
        "width_in_bounds": [
            (f"width is {lo} to {hi} px",
             gxe.ExpectColumnValuesToBeBetween(column="width", min_value=lo, max_value=hi,
                                               row_condition=Column("decodable") == True)),  # noqa: E712
        ],
        "height_in_bounds": [
            (f"height is {lo} to {hi} px",
             gxe.ExpectColumnValuesToBeBetween(column="height", min_value=lo, max_value=hi,
                                               row_condition=Column("decodable") == True)),  # noqa: E712
        ],
        "colour_mode_allowed": [
            # Of the files that decode: a mode the served model refuses (16-bit, 1-bit) makes a file
            # refused already, and the servable rule names it; counted here too, a file left out
            # under `servable` still failed the stage under this rule.
            (f"colour mode is one of {modes}",
             gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=modes,
                                             row_condition=Column("decodable") == True)),  # noqa: E712
        ],
        "body_part_flags_valid": [
            *[(f"flag {c} is 0 or 1", gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[0, 1]))
              for c in FLAG_COLUMNS],
            (f"where mixed is 0, exactly one of {', '.join(REGIONS)} is set ({BODY_PART_COUNT} is 1)",
             gxe.ExpectColumnValuesToBeInSet(
                 column=BODY_PART_COUNT, value_set=[1], row_condition=Column("mixed") == 0
             )),
            (f"where mixed is 1, two or more of {', '.join(REGIONS)} are set ({BODY_PART_COUNT} is 2 or more)",
             gxe.ExpectColumnValuesToBeBetween(
                 column=BODY_PART_COUNT, min_value=2, max_value=len(REGIONS), row_condition=Column("mixed") == 1
             )),
        ],
        "fractured_share_in_range": [
            (f"the share of fractured images (the class folder's label, else the csv's) is {low} to {high}",
             gxe.ExpectColumnMeanToBeBetween(column=GIVEN_LABEL, min_value=low, max_value=high)),
        ],
        "folder_label_matches_csv": [
            ("the class folder's label equals dataset.csv's fractured",
             gxe.ExpectColumnPairValuesToBeEqual(
                 column_A="folder_label", column_B="csv_label", ignore_row_if="either_value_is_missing"
             )),
        ],
        "fracture_count_matches_label": [
            ("where dataset.csv's fractured is 1, its fracture_count is 1 or more",
             gxe.ExpectColumnValuesToBeBetween(
                 column="fracture_count", min_value=1, row_condition=Column("csv_label") == 1
             )),
            # The check above passes an empty count, as GX's value checks pass empty cells.
            ("where dataset.csv's fractured is 1, its fracture_count is not empty",
             gxe.ExpectColumnValuesToNotBeNull(column="fracture_count", row_condition=Column("csv_label") == 1)),
            ("where dataset.csv's fractured is 0, its fracture_count is 0",
             gxe.ExpectColumnValuesToBeInSet(
                 column="fracture_count", value_set=[0], row_condition=Column("csv_label") == 0
             )),
        ],
        "not_truncated": [
            ("no file ends before the JPEG end-of-image marker",
             gxe.ExpectColumnValuesToBeInSet(column="truncated", value_set=[False])),
        ],
        "unique_content": [
            ("no two files are byte-identical (sha256)", gxe.ExpectColumnValuesToBeUnique(column="sha256")),
        ],
        "near_duplicate_labels_agree": [
            ("near-duplicate X-rays (one radiograph stored twice) carry the same label",
             gxe.ExpectColumnValuesToBeInSet(column="near_duplicate_conflict", value_set=[False])),
        ],
    }


def build_suites(params: ValidateParams, skipped: dict[str, str] | None = None) -> dict[str, gx.ExpectationSuite]:
    """The expectation suites run on every manifest: the hard rules and the soft rules.

    Each expectation carries its rule name in ``meta["rule"]`` and in its description (so the
    Data Docs name the rule), and its severity from ``validate.severity``.

    Args:
        params: bounds, allowed values and severities.
        skipped: rules left out (:func:`skipped_rules`), each with why; the suites' notes list them.

    Returns:
        ``hard`` and ``soft`` -> a suite named :data:`SUITE_NAMES`, not yet added to any
        context; a severity no rule has gets no suite.

    Raises:
        ConfigError: ``validate.severity`` does not name exactly the suite's rules.
    """
    severities = rule_severities(params)
    table = _rule_expectations(params)
    if tuple(table) != RULES:  # a rule added in one place only would silently lose its severity
        raise AssertionError(f"RULES and the suite's rules differ: {list(RULES)} vs {list(table)}")
    skipped = skipped or {}
    expectations: dict[str, list[Any]] = {HARD: [], SOFT: []}
    for rule, rule_expectations in table.items():
        if rule in skipped:
            continue
        for meaning, expectation in rule_expectations:
            expectation.severity = GX_SEVERITY[severities[rule]]
            expectation.description = f"{rule} ({severities[rule]}): {meaning}"
            expectation.meta = {"rule": rule, "severity": severities[rule]}
            expectations[severities[rule]].append(expectation)
    def notes(severity: str) -> list[str]:
        left_out = [f"`{r}`: {why}" for r, why in skipped.items() if severities[r] == severity]
        return [SUITE_NOTES[severity]] + (
            ["Skipped for this dataset's layout (ingest.layout): " + "; ".join(left_out) + "."] if left_out else []
        )

    # Built whole rather than by add_expectation, which needs an active context to save into.
    return {
        severity: gx.ExpectationSuite(
            name=SUITE_NAMES[severity],
            expectations=found,
            meta={"notes": {"format": "markdown", "content": notes(severity)}},
        )
        for severity, found in expectations.items()
        if found
    }


@dataclass(frozen=True)
class SuiteRun:
    """One run of the suites: the findings and GX's own results of that same run.

    Attributes:
        findings: one per rule, in :data:`RULES` order.
        results: ``hard`` / ``soft`` -> GX's validation result of that suite.
        outputs: the written files (see :func:`run_suite`).
    """

    findings: list[Finding]
    results: dict[str, ExpectationSuiteValidationResult]
    outputs: dict[str, str] = field(default_factory=dict)


def run_suite(
    manifest: pd.DataFrame, params: ValidateParams, gx_dir: Path | None = None, skipped: dict[str, str] | None = None
) -> SuiteRun:
    """Runs the hard and the soft suite once on the manifest through one GX Checkpoint.

    Args:
        manifest: the frame from :func:`fracture.manifest.build_manifest`.
        params: the validate section of ``params.yaml``.
        skipped: rules not run for this dataset's layout (:func:`skipped_rules`), each with why;
            their findings say so and pass.
        gx_dir: if given, GX's validation results (``validation_result.<hard|soft>.json``), the
            suites (``expectation_suite.<hard|soft>.json``) and static Data Docs
            (``data_docs/index.html``) of this run are written there, the Data Docs opening
            without internet (:mod:`fracture.docs_assets`). ``data_docs`` is replaced, so it
            shows this run only.

    Returns:
        The findings (one per rule, in :data:`RULES` order), GX's results and the written paths.

    Raises:
        ConfigError: ``validate.severity`` does not name exactly the suite's rules.
    """
    skipped = skipped or {}
    suites = build_suites(params, skipped)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if gx_dir is not None:
        docs = Path(gx_dir) / DOCS_DIR
        # Old pages would list earlier runs beside this one (each run has its own page).
        shutil.rmtree(docs, ignore_errors=True)
        docs.mkdir(parents=True)
        # An ephemeral context builds Data Docs as well as a file one, given a site on disk.
        context.add_data_docs_site(
            DOCS_SITE,
            {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE]))
    batch_definition = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("fracatlas")
        .add_batch_definition_whole_dataframe("all")
    )
    definitions = [
        context.validation_definitions.add(
            gx.ValidationDefinition(name=f"manifest_{severity}", data=batch_definition, suite=context.suites.add(suite))
        )
        for severity, suite in suites.items()
    ]
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=definitions,
            actions=actions,
            # COMPLETE lists every offending row; image_id names it in the report and the docs.
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["image_id"]},
        )
    )
    run_id = RunIdentifier(run_name=RUN_NAME, run_time=dt.datetime.now(dt.timezone.utc))
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": _for_gx(manifest)}, run_id=run_id)
    by_suite = {r.suite_name: r for r in checkpoint_result.run_results.values()}
    results = {severity: by_suite[suite.name] for severity, suite in suites.items()}
    findings = _findings(list(results.values()), rule_severities(params), skipped)
    outputs: dict[str, str] = {}
    if gx_dir is not None:
        outputs = _write_results(results, suites, Path(gx_dir))
        log.info("GX validation results and Data Docs written under %s", gx_dir)
    return SuiteRun(findings, results, outputs)


def _findings(
    suite_results: list[ExpectationSuiteValidationResult], severities: dict[str, str], skipped: dict[str, str]
) -> list[Finding]:
    """One finding per rule, in :data:`RULES` order, from GX's results of the suites."""
    by_rule: dict[str, list[Any]] = {r: [] for r in RULES}
    for suite_result in suite_results:
        for r in suite_result.results:
            by_rule[r.expectation_config.meta["rule"]].append(r)
    findings = []
    for rule, results in by_rule.items():
        if rule in skipped:
            findings.append(Finding(rule, severities[rule], True, 0, [], skipped=skipped[rule]))
            continue
        ids: set[str] = set()
        observed = None
        errors = []
        for r in results:
            details = r.result or {}
            rows = details.get("unexpected_index_list") or []
            ids |= {str(row["image_id"]) for row in rows if isinstance(row, dict)}
            error = _gx_error(r.exception_info)
            if error:
                errors.append(f"{r.expectation_config.description}: {error}")
            elif observed is None:
                observed = _jsonable(details.get("observed_value"))
        if errors:
            # E.g. a column the manifest lacks: the expectation fails without offending rows,
            # so the finding carries GX's message instead of failing silently.
            observed = "GX could not evaluate " + "; ".join(errors)
        findings.append(
            Finding(
                rule=rule,
                severity=severities[rule],
                success=all(bool(r.success) for r in results),
                unexpected_count=len(ids),
                unexpected_ids=sorted(ids),
                observed=observed,
            )
        )
    return findings


def _gx_error(info: Any) -> str | None:
    # exception_info is one {raised_exception, exception_message, ...} dict, or one per metric.
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message")) if info.get("raised_exception") else None
    messages = dict.fromkeys(m for m in (_gx_error(v) for v in info.values()) if m)  # unique, in order
    return "; ".join(messages) or None


def _write_results(
    results: dict[str, ExpectationSuiteValidationResult], suites: dict[str, gx.ExpectationSuite], gx_dir: Path
) -> dict[str, str]:
    gx_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for severity, result in results.items():
        paths[f"result_{severity}"] = gx_dir / RESULT_FILE.format(severity)
        paths[f"suite_{severity}"] = gx_dir / SUITE_FILE.format(severity)
        paths[f"result_{severity}"].write_text(json.dumps(result.to_json_dict(), indent=2) + "\n")
        paths[f"suite_{severity}"].write_text(json.dumps(suites[severity].to_json_dict(), indent=2) + "\n")
    paths["data_docs"] = gx_dir / DOCS_DIR / "index.html"
    if not paths["data_docs"].is_file():
        raise RuntimeError(f"GX built no Data Docs index at {paths['data_docs']}; check the GX log above")
    make_offline(paths["data_docs"].parent)
    return {k: str(v) for k, v in paths.items()}


def _for_gx(manifest: pd.DataFrame) -> pd.DataFrame:
    # GX compares with plain Python values; nullable extension dtypes (and pandas' string dtype)
    # become object columns with None for missing values, which column-map expectations skip.
    out = manifest.copy()
    # Derived for body_part_flags_valid; NA when a flag is missing (a file with no csv row, or
    # a dataset.csv without the column, which the flag's own expectation then reports).
    if all(c in out for c in REGIONS):
        count = out[list(REGIONS)].astype("Int64").sum(axis=1, skipna=False)
    else:
        count = pd.Series(pd.NA, index=out.index)
    out[BODY_PART_COUNT] = count.astype("Int64")
    out[GIVEN_LABEL] = out["folder_label"].astype("Int64").fillna(out["csv_label"].astype("Int64"))
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
