"""The Markdown report each retrain flow run publishes as a Prefect artifact.

A pure function of the flow's typed result, so the text can be tested without Prefect.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from flows.result import (
    AliasMove,
    RegistryState,
    RetrainFailure,
    RetrainResult,
    SinceChampion,
    VersionOrigin,
    alias_moves,
    registry_changed,
    was_promoted,
)
from fracture.evaluation import TOO_FEW, PairedAUC
from fracture.model_card import QUALITY_BAR, _fmt_threshold, quality_bar
from fracture.registry import (
    DETECTOR_ROLLBACK_COMMAND,
    NO_CHAMPION_WHY,
    PREVIOUS_CHAMPION,
    ROLLBACK_COMMAND,
    Registration,
)

REPORT_KEY = "retrain-report"

# (label, metrics.json key, has a 95% interval)
METRIC_ROWS = (
    ("ROC AUC", "roc_auc", True),
    ("Sensitivity (recall)", "recall", True),
    ("Specificity", "specificity", True),
    ("Precision", "precision", False),
    ("F1", "f1", False),
    ("Average precision", "average_precision", False),
    ("Accuracy", "accuracy", False),
    ("Decision threshold", "threshold", False),
    ("Expected calibration error", "ece", False),
    ("Brier score", "brier", False),
)


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


#: The metrics that are decision thresholds: printed as the model card prints them, to four significant
#: digits, since a threshold chosen on val can be 8e-06, which four decimals print as 0.0000.
THRESHOLD_KEYS = frozenset({"threshold", "image_threshold"})


def _value(key: str, value: Any) -> str:
    """A metric's value: a threshold as the model card prints it, any other to four decimals."""
    return _fmt_threshold(value) if key in THRESHOLD_KEYS and isinstance(value, float) else _num(value)


def _count(value: Any) -> str:
    # metrics.json stores every number as a float, counts included.
    return "n/a" if value is None else str(int(value))


def _cell(text: str) -> str:
    # A table cell ends at an unescaped pipe or a line break.
    return text.replace("|", "\\|").replace("\n", " ")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _code(value: str | None) -> str:
    return f"`{value}`" if value else "none"


def render_report(result: RetrainResult) -> str:
    """The run's report as Markdown: outcome, data version, stages, test metrics, promotion.

    Args:
        result: the flow's result.

    Returns:
        Markdown text for ``prefect.artifacts.create_markdown_artifact``.
    """
    ingest, reg, m = result.ingest, result.registration, result.evaluate.metrics
    copied = (
        "source unchanged since the last ingest: nothing copied"
        if ingest.unchanged
        else "dataset copied and hashed (`dvc add data`)"
    )
    outcome = _outcome(result)

    lines = [
        "# Retraining report",
        "",
        outcome,
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| Data version (DVC md5 of `data`) | {_code(ingest.data_version)} |",
        f"| Data version of the last completed run | {_code(ingest.previous_version)} |",
        f"| Data changed | {'yes' if ingest.changed else 'no'} |",
        "| Split (images) | " + ", ".join(f"{k} {v}" for k, v in result.split.sizes.items()) + " |",
        f"| Excluded by validation | {_excluded(result.validate.excluded)} |",
        "",
        *(_since_champion_lines(result.since_champion, reg.stand_in) if result.since_champion is not None else []),
        "## Stages",
        "",
        "| Stage | DVC | Seconds | of which the command | of which DVC's checks, hashing and caching |",
        "|---|---|---:|---:|---:|",
        f"| ingest | {copied} | {ingest.seconds:.1f} | | |",
        *(
            f"| {s.stage} | {s.outcome} | {s.seconds:.1f} | {_seconds(s.command_seconds)} | "
            f"{_seconds(s.dvc_seconds)} |"
            for s in result.runs.values()
        ),
        "",
        f"## Test metrics ({result.profile} profile, {result.train.model.architecture})",
        "",
        (
            f"Test split: {_count(m.get('n_images'))} images, {_count(m.get('n_fractured'))} fractured; "
            f"MLflow run {_code(result.train.run_id)}."
        ),
        "",
        "| Metric | Value | 95% CI |",
        "|---|---:|---|",
    ]
    for label, key, has_ci in METRIC_ROWS:
        low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        ci = f"{_num(low)} – {_num(high)}" if has_ci and low is not None and high is not None else ""
        lines.append(f"| {label} | {_value(key, m.get(key))} | {ci} |")
    lines += [
        "",
        *([quality_bar(m) + "."] if all(m.get(key) is not None for key, _, _ in QUALITY_BAR) else []),
        "",
        "Intervals: ROC AUC's by a bootstrap over the test images, linked images (copies, near-duplicates, one "
        "patient's) drawn together; sensitivity's and specificity's Wilson score intervals over each class's "
        "effective number of images. The model card (`outputs/evaluate/model_card.md`, and each registered "
        "version's `artifacts/model_card.md`) says how the threshold was chosen, what the data holds and where "
        "not to trust the model. NOT FOR CLINICAL USE.",
    ]

    champion = "yes" if reg.champion else "no"
    lines += [
        "",
        "## Promotion decision",
        "",
        "| | |",
        "|---|---|",
        f"| Model | {reg.name} version {reg.version} |",
        f"| Registered by this run | {'yes' if reg.created else 'no (already registered)'} |",
        f"| Training run | {_code(reg.run_id)} |",
        f"| Test ROC AUC (evaluate stage) | {_num(reg.score)} |",
        *_comparison_rows(reg),
        f"| Holds `champion` | {champion} |",
        f"| Decision | {reg.decision} |",
        f"| Champion before this run | {_champion_before(reg)} |",
        f"| Aliases now | {', '.join(reg.aliases) or 'none'} |",
        f"| Aliases moved by this run | {_moves(result.moves)} |",
        f"| Reason | {_cell(reg.reason)} |",
        "",
    ]
    lines += _checks(reg)
    if note := no_champion_note(reg):
        lines += [f"**No champion.** {note}", ""]
    if result.detector is not None:
        lines += _detector_lines(result)
    return "\n".join(lines)


def render_failure_report(failure: RetrainFailure) -> str:
    """The report of a run that failed, published under the same key as a completed run's.

    Without it, ``retrain-report`` would still show the last completed run's promotion the morning
    after a run that failed. It says where the run stopped and why, what it finished, and what the
    registry holds after the failure: the version consumers load (``champion``), the newest one,
    and any version registered that the gate has not decided on.

    Args:
        failure: where and why the run failed, and what it had done.

    Returns:
        Markdown text for ``prefect.artifacts.create_markdown_artifact``.
    """
    f = failure
    finished = [f"ingest ({'nothing copied' if f.ingest.unchanged else 'dataset copied and hashed'})"] if f.ingest else []
    finished += [f"{s.stage} ({s.outcome})" for s in f.runs.values()]
    lines = [
        "# Retraining report",
        "",
        f"**Failed** at stage {f.stage}: {f.error}",
        "",
        "The stages after it did not run. The registry below is as the failure left it (the version consumers "
        "load holds `champion`); the flow run's logs hold the error's full text.",
        "",
        "## Run",
        "",
        "| | |",
        "|---|---|",
        f"| Failed at stage | {f.stage} |",
        f"| Error | {_cell(f.error)} |",
        f"| Stages finished | {', '.join(finished) or 'none'} |",
        f"| Profile | {f.profile or 'not chosen yet'} |",
        f"| Data version (DVC md5 of `data`) | {_code(f.ingest.data_version) if f.ingest else 'not known (ingest did not finish)'} |",
        f"| Data version of the last completed run | {_code(f.previous_version)} |",
    ]
    if f.registration is not None:
        r = f.registration
        lines.append(f"| Registered before the failure | {r.name} version {r.version}: {r.decision} ({_cell(r.reason)}) |")
    lines += ["", "## Registry after the failure", ""]
    if f.registry_error is not None:
        return "\n".join([*lines, f"Not read: {f.registry_error}.", ""])
    lines += [
        "| Model | Aliases | Newest version | Registered, not decided by the gate | Aliases moved by this run |",
        "|---|---|---|---|---|",
    ]
    for name, state in f.registry.items():
        before = f.registry_before.get(name)
        # Read just before the register task: a run that failed earlier moved no alias.
        moved = "none" if before is None else _moves(alias_moves(before, state))
        lines.append(
            f"| {name} | {_aliases(state)} | {state.newest_version or 'none'} | "
            f"{', '.join('version ' + v for v in state.undecided) or 'none'} | {moved} |"
        )
    lines.append("")
    if any(state.undecided for state in f.registry.values()):
        lines += [
            "A version registered but not decided is one whose registration stopped before the gate decided on "
            "it: it holds no `champion`, and the next run's register task decides it.",
            "",
        ]
    return "\n".join(lines)


#: How many params, and how many packages, that differ the "Since the champion" table lists; it counts the rest.
MAX_DIFFERENCES = 15
#: The longest param value a cell shows (a list of layers can run long); the run in MLflow has it whole.
MAX_VALUE_CHARS = 60


def _since_champion_lines(since: SinceChampion, stand_in: str | None = None) -> list[str]:
    """What the version this run registered was built from, against the champion it challenged.

    The morning after a run this is what tells an engineer why the two models differ: new data, new
    code, another profile, changed params, upgraded packages. Params and packages list only those
    that differ, the first :data:`MAX_DIFFERENCES` of each, and count the rest. ``stand_in``: the
    ``previous-champion`` version the gate compared with where no version held champion
    (:attr:`Registration.stand_in`), named as such when it is the version set against.
    """
    old, new = since.champion, since.new
    role = PREVIOUS_CHAMPION if stand_in is not None and stand_in == old.version else "champion"
    if role == "champion":
        lines = [f"## Since the champion (version {old.version})", ""]
    else:
        lines = [f"## Since {role} (version {old.version}), standing in for the champion", "",
                 f"No version held `champion`: the gate compared version {new.version} with `{role}` version "
                 f"{old.version} instead, the last champion the registry holds.", ""]
    if since.error is not None:
        return [*lines, (f"Not read from the registry ({_cell(since.error)}); the registration below stands. MLflow "
                         "shows each version's tags and its training run's params and tags."), ""]
    lines += [
        (f"What version {new.version}, registered by this run, was built from, against {role} version "
         f"{old.version}: the versions' registry tags, their training runs' MLflow params, and the packages each "
         "model pins (its `requirements.txt`, written when it was registered)."),
        "",
        f"| | {role[0].upper() + role[1:]} (version {old.version}) | This run's (version {new.version}) |",
        "|---|---|---|",
        f"| Trained in MLflow run | {_code(old.run_id) if old.run_id else 'none named'} | "
        f"{_code(new.run_id) if new.run_id else 'none named'} |",
        _pair("Data version", _code(old.data_version) if old.data_version else "not recorded",
              _code(new.data_version) if new.data_version else "not recorded"),
        _pair("Code commit", _commit(old), _commit(new)),
        _pair("Training profile", old.profile or "not recorded", new.profile or "not recorded"),
        *_params_rows(old, new),
        *_packages_rows(old, new),
        "",
    ]
    if old.params is not None and new.params is not None and old.packages is not None and new.packages is not None:
        lines += [(f"Compared: {len(set(old.params) | set(new.params))} params and "
                   f"{len(set(old.packages) | set(new.packages))} packages; the rows name those that differ."), ""]
    return lines


def _pair(label: str, old: str, new: str) -> str:
    """A row of the champion's value and the new version's, the new one marked when it is the same."""
    return f"| {label} | {old} | {new}{' (same)' if old == new and not old.startswith('not ') else ''} |"


def _commit(origin: VersionOrigin) -> str:
    """The commit, shortened as git shows it, with the files no commit held when the code was dirty."""
    if not origin.git_commit:
        return "not recorded"
    sha, dirty, _ = origin.git_commit.partition("-dirty")
    text = f"`{sha[:12]}{'-dirty' if dirty else ''}`"
    return text + (f", not committed: {_cell(origin.dirty_files)}" if origin.dirty_files else "")


def _unknown_params(origin: VersionOrigin) -> str:
    if origin.run_id is None:
        return "not known: the version names no training run"
    return f"not known: its run {_code(origin.run_id)} is gone"


def _value_cell(value: str | None, missing: str) -> str:
    if value is None:
        return missing
    short = value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 1] + "…"
    return _cell(short)


def _difference_rows(kind: str, old: dict[str, str], new: dict[str, str], missing: str) -> list[str]:
    """A row for each key whose value differs (the first :data:`MAX_DIFFERENCES`, by name), and a count of the rest."""
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    rows = [
        f"| {kind.capitalize()} `{key}` | {_value_cell(old.get(key), missing)} | {_value_cell(new.get(key), missing)} |"
        for key in differ[:MAX_DIFFERENCES]
    ]
    if (rest := len(differ) - MAX_DIFFERENCES) > 0:
        rows.append(f"| {rest} more {kind}s differ, not listed | | |")
    return rows


def _params_rows(old: VersionOrigin, new: VersionOrigin) -> list[str]:
    """The training params that differ between the two runs, or why they were not compared."""
    if old.params is None or new.params is None:
        def known(o: VersionOrigin) -> str:
            return _unknown_params(o) if o.params is None else f"{len(o.params)} logged"

        return [f"| Training params (MLflow) | {known(old)} | {known(new)} |"]
    if rows := _difference_rows("param", old.params, new.params, "not logged"):
        return rows
    return [f"| Training params (MLflow) | {len(old.params)} logged | {len(new.params)} logged, none differs |"]


def _packages_rows(old: VersionOrigin, new: VersionOrigin) -> list[str]:
    """The package versions that differ between the two models' pins, or why they were not compared."""
    if old.packages is None or new.packages is None:
        def known(o: VersionOrigin) -> str:
            return f"not recorded ({_cell(o.packages_unread or 'not read')})" if o.packages is None else f"{len(o.packages)} pinned"

        return [f"| Packages | {known(old)} | {known(new)} |"]
    if rows := _difference_rows("package", old.packages, new.packages, "not pinned"):
        return rows
    return [f"| Packages | {len(old.packages)} pinned | {len(new.packages)} pinned, none differs |"]


def _aliases(state: RegistryState) -> str:
    champion_first = sorted(state.aliases, key=lambda a: (a != "champion", a))
    return ", ".join(f"`{a}` version {state.aliases[a]}" for a in champion_first) or "none"


def _excluded(excluded: dict[str, dict[str, str]]) -> str:
    """How many images validation left out, how many under each rule, and where each one's reason is listed."""
    if not excluded:
        return "0"
    rules = Counter(e.get("rule") or "unknown rule" for e in excluded.values())
    per_rule = ", ".join(f"{rule} {n}" for rule, n in sorted(rules.items(), key=lambda r: (-r[1], r[0])))
    return (f"{len(excluded)} ({_cell(per_rule)}); each image with its rule and reason under `excluded` in "
            "`outputs/validate/report.json`")


def _outcome(result: RetrainResult) -> str:
    """The report's headline: what the run changed, a promotion or an alias move included."""
    ingest, reg = result.ingest, result.registration
    if result.nothing_changed:
        kept = _not_promoted(reg, result.moves)
        return (
            "**Nothing changed**: the data version of the last completed run, and DVC found every stage up to "
            "date (their code and params as `dvc.lock` records them; installed packages, torch and timm among "
            "them, are no DVC dependency, so an upgrade alone retrains nothing); the registry is as it was "
            f"({reg.name} version {reg.version} is the model these outputs belong to)."
            f"{' ' + kept[0].upper() + kept[1:] + '.' if kept else ''}"
        )
    data = (
        f"new data version {_code(ingest.data_version)} (was {_code(ingest.previous_version)})"
        if ingest.changed
        else f"same data version {_code(ingest.data_version)}"
    )
    ran, restored = result.stages_ran, result.stages_restored
    registry = registry_summary(result)
    if ran or restored:
        return (
            f"**{'Retrained' if ran else 'Restored'}**: {data}; DVC ran {', '.join(ran) if ran else 'no stage'}"
            + (f" and restored {', '.join(restored)} from its run cache (an earlier run with the same data, code "
               "and parameters)" if restored else "")
            + f"; {registry}."
        )
    # Nothing reproduced, yet the registry changed: register.* in params.yaml is no DVC param, and a
    # registration stopped before its gate ran completes in the next run.
    title = "Promoted" if result.promoted else "Registry changed" if result.registry_changed else "Up to date"
    return f"**{title}**: {data}, and DVC found every stage up to date (nothing retrained); {registry}."


def registry_summary(result: RetrainResult) -> str:
    """What the run did to the registry: the classifier's version, promotion and alias moves, and the
    detector's when the run changed its registry.

    Args:
        result: the flow's result.

    Returns:
        One clause, e.g. ``fracture-classifier version 2 was already registered and promoted to
        `champion`; aliases moved: `champion` version 1 → version 2``.
    """
    text = _registry_clause(result.registration, result.moves)
    d = result.detector
    if d is not None and registry_changed(d.registration, d.moves):
        text += "; " + _registry_clause(d.registration, d.moves)
    return text


def _registry_clause(reg: Registration, moves: tuple[AliasMove, ...]) -> str:
    """What this run did to one registered model: the version, its promotion and the aliases it moved."""
    text = f"{reg.name} version {reg.version} {'registered' if reg.created else 'was already registered'}"
    if was_promoted(reg, moves):
        text += " and promoted to `champion`"
        if not moves:
            text += f" (champion before: {'none' if reg.champion_version is None else 'version ' + reg.champion_version})"
    elif kept := _not_promoted(reg, moves):
        text += f", {kept}"
    if moves:
        text += "; aliases moved: " + ", ".join(m.describe() for m in moves)
    return text


def _not_promoted(reg: Registration, moves: tuple[AliasMove, ...] = ()) -> str | None:
    """``not promoted: champion stays version 2 (failed: beats champion)`` for a version that does not
    hold ``champion`` after the run; ``None`` for one that does."""
    if reg.champion or was_promoted(reg, moves):
        return None
    stays = "no version holds `champion`" if reg.champion_version is None else f"champion stays version {reg.champion_version}"
    if reg.stand_in is not None:
        stays += f"; `{PREVIOUS_CHAMPION}` version {reg.stand_in} stood in for it"
    return f"not promoted: {stays} ({_why_not(reg)})"


def _why_not(reg: Registration) -> str:
    """Why a version is not champion, in a few words: the gate checks it failed, or what held the gate back."""
    if failed := [c.name for c in reg.checks if not c.passed]:
        return "failed: " + ", ".join(failed)
    if reg.reason.startswith("already decided"):
        return "lost the gate before, on this test split and these rules"
    if "rolled back" in reg.reason:
        return "rolled back from champion before; not promoted again automatically"
    return reg.reason or reg.decision


def _moves(moves: tuple[AliasMove, ...]) -> str:
    return ", ".join(m.describe() for m in moves) or "none"


def no_champion_note(reg: Registration, detector: bool = False) -> str | None:
    """What a run that leaves the registry without a ``champion`` means, and what to do; else ``None``.

    That happens when the first version registered fails the gate (a floor, usually): consumers
    loading ``models:/<name>@champion`` then find nothing. It happens too when the champion's
    version was deleted and the new version did not beat ``previous-champion``, the last champion
    the registry holds: then one rollback (``fracture rollback``, with ``--detector`` for the
    fracture detector, ``detector``) serves that version again, and the note says so. The first
    fracture detector that fails its gate gets no note: the advice on floors is the classifier's.
    """
    if reg.champion or reg.champion_version is not None:
        return None
    failed = "; ".join(f"{c.name}: {c.detail}" for c in reg.checks if not c.passed) or reg.reason
    if reg.previous_champion is not None:
        command = DETECTOR_ROLLBACK_COMMAND if detector else ROLLBACK_COMMAND
        kept = "" if reg.version == reg.previous_champion else (
            f" Version {reg.version} stays `challenger` ({failed})." if reg.decision == "challenger"
            else f" Version {reg.version} is not promoted ({reg.reason})."
        )
        return (
            f"No version of {reg.name} holds `champion` ({NO_CHAMPION_WHY}), so `models:/{reg.name}@champion` has "
            f"nothing to load; `{PREVIOUS_CHAMPION}` is version {reg.previous_champion}, the last champion the "
            f"registry holds: `{command} --reason \"...\"` restores it as champion, once it loads as a consumer "
            f"would.{kept}"
        )
    if detector:
        return None
    return (
        f"No version of {reg.name} holds `champion`, so `models:/{reg.name}@champion` has nothing to load "
        f"until a version passes the gate; version {reg.version} stays `challenger` ({failed}). The floors "
        "(`register.floors` in params.yaml) are what a clinical consumer needs, not a figure to chase: training "
        "again until one run's test figures clear them would choose the model on the test split. Improve the "
        "recipe without the test split (docs/recipe.md, \"Cross-validating a recipe\"), or train the paper profile on a "
        "GPU, and let the gate judge the next run."
    )


def _checks(reg: Registration) -> list[str]:
    if not reg.checks:
        return []
    lines = ["| Gate check | Result | Detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {'pass' if c.passed else '**fail**'} | {_cell(c.detail)} |" for c in reg.checks]
    return [*lines, ""]


# (label, detector metrics.json key, has a 95% interval)
DETECTOR_ROWS = (
    ("mAP@0.5", "map_50", True),
    ("mAP@0.5:0.95", "map", True),
    ("Recall (at most 20 boxes an image; COCO's mar_100)", "mar_100", False),
    ("Top box as a classifier: ROC AUC", "image_roc_auc", True),
    ("Top box as a classifier: sensitivity", "image_sensitivity", True),
    ("Top box as a classifier: specificity", "image_specificity", True),
    ("Image-level threshold (chosen on val)", "image_threshold", False),
)


def _detector_lines(result: RetrainResult) -> list[str]:
    """The detector's section (``detect.enabled``): its stages, test metrics and promotion."""
    d = result.detector
    assert d is not None
    m, reg = d.metrics, d.registration
    stages = ", ".join(f"{s.stage} {s.outcome} ({s.seconds:.1f} s)" for s in d.runs.values())
    lines = [
        "## Fracture detector",
        "",
        (
            f"Test split: {_count(m.get('n_images'))} images, {_count(m.get('n_fractured'))} with "
            f"{_count(m.get('n_boxes'))} fracture boxes ({_count(m.get('n_excluded'))} left out, each with its reason "
            f"in `outputs/detect/test_excluded.csv`); stages {stages}."
        ),
        "",
        "| Metric | Value | 95% CI |",
        "|---|---:|---|",
    ]
    for label, key, has_ci in DETECTOR_ROWS:
        low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        ci = f"{_num(low)} – {_num(high)}" if has_ci and low is not None and high is not None else ""
        lines.append(f"| {label} | {_value(key, m.get(key))} | {ci} |")
    lines += [
        "",
        "| | |",
        "|---|---|",
        f"| Model | {reg.name} version {reg.version} |",
        f"| Registered by this run | {'yes' if reg.created else 'no (already registered)'} |",
        f"| Holds `champion` | {'yes' if reg.champion else 'no'} |",
        f"| Decision | {reg.decision} |",
        f"| Aliases now | {', '.join(reg.aliases) or 'none'} |",
        f"| Aliases moved by this run | {_moves(d.moves)} |",
        f"| Reason | {_cell(reg.reason)} |",
        "",
    ]
    lines += _checks(reg)
    if note := no_champion_note(reg, detector=True):
        lines += [f"**No detector champion.** {note}", ""]
    return lines


def _against(reg: Registration) -> str:
    """The version the gate decided against, as the registry names it: ``champion version 2``, or, where no
    version held champion, ``previous-champion version 1``, which stood in for it (:attr:`Registration.stand_in`)."""
    if reg.stand_in is not None:
        return f"{PREVIOUS_CHAMPION} version {reg.stand_in}, standing in for the champion (no version held `champion`)"
    if reg.comparison is not None:
        return f"{reg.comparison.against} version {reg.comparison.champion_version}"
    return f"champion version {reg.champion_version}"


def _champion_before(reg: Registration) -> str:
    if reg.champion_version is not None:
        return f"version {reg.champion_version}"
    if reg.stand_in is not None:
        return f"none; `{PREVIOUS_CHAMPION}` version {reg.stand_in} stood in for it"
    return "none"


def _not_compared(reg: Registration) -> str:
    """Why the version was not compared with the champion, from the gate's decision and its reason."""
    if reg.champion and reg.decision == "unchanged":
        return "no: this version already is the champion"
    if reg.champion_version is None and reg.stand_in is None:
        if reg.decision == "unchanged" and reg.previous_champion == reg.version:
            return (f"no: no version holds `champion`, and this version is `{PREVIOUS_CHAMPION}`, which a rollback "
                    "restores (see Reason)")
        if reg.reason.startswith(f"no version holds champion or {PREVIOUS_CHAMPION}"):
            return f"no: no version held `champion` or `{PREVIOUS_CHAMPION}` (see Reason)"
        return "no: there was no champion"
    if reg.reason.startswith("already decided"):
        return (f"no: decided before against {_against(reg)}, on this test split and these rules; the recorded "
                "decision stands (see Reason)")
    if "rolled back" in reg.reason:
        return "no: this version was rolled back from champion; it is not scored again"
    scored = "the champion" if reg.stand_in is None else PREVIOUS_CHAMPION
    return (f"no: decided without scoring {_against(reg)} (a floor failed, or {scored} could not be scored: see the "
            "gate checks and Reason)")


def _auc_difference_rows(a: PairedAUC, confidence: float) -> list[str]:
    """The AUC difference with its interval and p-value; where DeLong's variance gave no interval
    (:attr:`PairedAUC.no_interval`), why not, and the p-value's test or that nothing was measured.
    An interval of ``+0.0000 to +0.0000`` read as certainty where there was no spread to measure."""
    needs = f"needs < {1 - confidence:.3g}"
    if not a.no_interval:
        return [f"| AUC difference ({a.confidence:.0%} CI) | {a.difference:+.4f} ({a.ci_low:+.4f} to {a.ci_high:+.4f}) |",
                f"| DeLong p-value ({needs}) | {a.p_value:.3g} |"]
    p_value = (f"{a.p_value:.3g} (paired randomisation test)" if a.test == "paired randomisation"
               else "none: nothing measured" if a.no_interval == TOO_FEW else "none: no difference to measure")
    return [f"| AUC difference (no interval) | {a.difference:+.4f}: {_cell(a.evidence())} |",
            f"| p-value ({needs}) | {p_value} |"]


def _comparison_rows(reg: Registration) -> list[str]:
    """The paired comparison with the champion on the same test images, when there was one."""
    c = reg.comparison
    if c is None:
        return [f"| Compared with the champion | {_not_compared(reg)} |"]
    a = c.auc
    left_out = f" ({c.left_out} it was trained or validated on, or linked to such, left out)" if c.left_out else ""
    return [
        f"| Compared with | {_against(reg)}, on the same {a.n_images} test images{left_out} |",
        f"| ROC AUC, this version vs {c.against} | {_num(a.auc_a)} vs {_num(a.auc_b)} |",
        *_auc_difference_rows(a, reg.confidence),
        (
            f"| Sensitivity change at served thresholds (tolerance {reg.sensitivity_tolerance:g}) | "
            f"{c.sensitivity_change:+.4f} ({_num(c.candidate_sensitivity)} vs {_num(c.champion_sensitivity)}) |"
        ),
        (
            f"| Specificity change at served thresholds (tolerance {reg.specificity_tolerance:g}) | "
            f"{c.specificity_change:+.4f} ({_num(c.candidate_specificity)} vs {_num(c.champion_specificity)}) |"
        ),
    ]
