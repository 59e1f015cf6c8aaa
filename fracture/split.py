"""Seeded train/val/test split that keeps byte-identical files and near-duplicate X-rays together.

Two strategies (``split.strategy``):

* ``stratified``: every included image is drawn at random, seeded, with the ``val_size`` and
  ``test_size`` shares, stratified by label and, with ``stratify_body_part``, by body part.
* ``published``: FracAtlas's ``Utilities/Fracture Split`` lists place the images they name;
  the rest (all non-fractured images and any fractured image no list names) are drawn as in
  ``stratified``.

Either way the unit of the draw is a group: byte-identical files (same ``sha256``),
near-duplicate X-rays (the validate stage's ``near_duplicate_group``, :mod:`fracture.near_duplicates`)
and one patient's images (``patient_id``: a hospital export's labels.csv column, else its DICOM
files' Patient ID) joined into one, so neither a copy, nor a re-encoded or repeated exposure, nor
another view of a test patient can sit in training.

With ``split.keep`` the images :data:`ASSIGNMENTS_FILE` names stay in the split it records for
them (by image id, else by content), their groups with them, and only the rest are drawn, filling
what each split's share lacks: when the export grows, earlier test images stay unseen by every
later model. The split stage records each split it draws there (:func:`keep_assignments`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fracture.config import SplitParams
from fracture.manifest import ManifestError, body_part
from fracture.near_duplicates import group_ids
from fracture.workspace import ASSIGNMENTS_FILE, replace_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Where the published lists live inside a FracAtlas folder, and which file holds each split.
PUBLISHED_SUBDIR = Path("Utilities") / "Fracture Split"
PUBLISHED_FILES = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}
LABEL_NAMES = {0: "not fractured", 1: "fractured"}
OTHER_PARTS = "other parts"
ASSIGNMENT_COLUMNS = ("image_id", "sha256", "split")
# The splits from the one nearest test, which a recorded image never leaves for a farther one.
_BY_NEAREST_TEST = ("test", "val", "train")
_NEAREST_TEST = {name: rank for rank, name in enumerate(_BY_NEAREST_TEST)}


class SplitError(ValueError):
    """The included images cannot be split as asked."""


GROUP_TOO_LARGE = (
    "the largest group of linked images holds a larger share of the images than split.val_size or "
    "split.test_size, so should it go to val or test, that split cannot have the size asked. One "
    "patient_id (or DICOM Patient ID) shared by images of different patients, or a "
    "validate.near_duplicate_threshold that joins look-alikes, does this; check those images"
)


@dataclass(frozen=True, eq=False)
class SplitReport:
    """How a split was drawn, for the CLI to print and write.

    Attributes:
        strategy: ``stratified`` or ``published``.
        strata: one row per stratum of the seeded draw (with ``published``, the draw of the
            images no list places): ``stratum``, ``label``, ``parts`` (the body parts pooled in
            it), ``groups`` (distinct contents) and the groups that went to ``train``, ``val``
            and ``test``.
        published: included images placed by the published lists, per split (empty for
            ``stratified``); counts images, so duplicates that followed a listed copy count.
        moved: ids placed by a group member's list entry rather than their own, to keep a group
            (identical files, near-duplicates) in one split: ``image_id``, ``listed`` (the split its own list
            entry names, empty when no list names it) and ``assigned``.
        unlisted_fractured: included fractured ids that no published list names.
        listed_left_out: ids a published list names that are not among the included images
            (excluded by validation, or absent from the manifest).
        listed_not_fractured: included ids a published list names although their label is
            non-fractured; they follow the list.
        largest_group: the group of linked images (identical files, near-duplicates, one
            patient's) with the most members: ``first_id``, ``images``, ``of`` (the included
            images) and ``above_share`` (its share is more than ``val_size`` or ``test_size``,
            so val's or test's size cannot come out as asked should the group go there).
        kept: included images placed where :data:`ASSIGNMENTS_FILE` records them, per split
            (with the members of their groups it does not name); empty when nothing was kept.
        kept_moved: ids whose recorded split their group overrode (a new link joined groups
            recorded in different splits; the group goes to the split nearest test among
            theirs): ``image_id``, ``recorded`` and ``assigned``.
        kept_absent: ids the file names that are not among the included images (left out of
            the export, or excluded by validation); they keep their row for when they return.
    """

    strategy: str
    strata: pd.DataFrame
    published: dict[str, int] = field(default_factory=dict)
    moved: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["image_id", "listed", "assigned"]))
    unlisted_fractured: tuple[str, ...] = ()
    listed_left_out: tuple[str, ...] = ()
    listed_not_fractured: tuple[str, ...] = ()
    largest_group: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    kept_moved: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["image_id", "recorded", "assigned"])
    )
    kept_absent: int = 0

    def summary(self) -> list[str]:
        """Human-readable lines: what the lists placed, what moved, what was left out."""
        lines = []
        if self.kept:
            counts = ", ".join(f"{name} {self.kept.get(name, 0)}" for name in SPLITS)
            lines.append(f"kept where {ASSIGNMENTS_FILE} records them: {sum(self.kept.values())} images ({counts})")
        if self.kept_absent:
            lines.append(f"{ASSIGNMENTS_FILE} names {self.kept_absent} ids that are not among the included images")
        for row in self.kept_moved.itertuples(index=False):
            lines.append(
                f"moved to keep its group together: {row.image_id} ({ASSIGNMENTS_FILE}: {row.recorded}) -> {row.assigned}"
            )
        if self.strategy == "published":
            counts = ", ".join(f"{name} {self.published.get(name, 0)}" for name in SPLITS)
            lines.append(f"published lists placed {sum(self.published.values())} images ({counts})")
        if self.strata.empty:
            placed = " and ".join([*(["the published lists"] if self.strategy == "published" else []),
                                   *([ASSIGNMENTS_FILE] if self.kept else [])]) or "nothing"
            lines.append(f"seeded draw: none, {placed} placed every image")
        else:
            drawn = ", ".join(f"{name} {int(self.strata[name].sum())}" for name in SPLITS)
            lines.append(f"seeded draw over {int(self.strata['groups'].sum())} distinct images ({drawn}) in strata:")
        for row in self.strata.itertuples(index=False):
            lines.append(
                f"  {row.stratum} [{row.parts}]: {row.groups} -> train {row.train}, val {row.val}, test {row.test}"
            )
        for row in self.moved.itertuples(index=False):
            why = f"listed in {row.listed}" if row.listed else "in no list"
            lines.append(f"moved to keep its group together: {row.image_id} ({why}) -> {row.assigned}")
        for ids, what in (
            (self.unlisted_fractured, "fractured ids in no published list"),
            (self.listed_left_out, "listed ids left out (excluded or not in the manifest)"),
            (self.listed_not_fractured, "listed ids labelled non-fractured (they follow the list)"),
        ):
            if ids:
                lines.append(f"{what}: {len(ids)}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
        if self.largest_group:
            big = self.largest_group
            lines.append(
                f"largest group of linked images: {big['images']} of {big['of']} (first id {big['first_id']})"
            )
            if big["above_share"]:
                lines.append(f"WARNING: {GROUP_TOO_LARGE}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, for ``outputs/split/report.json``."""
        return {
            "strategy": self.strategy,
            "strata": self.strata.to_dict(orient="records"),
            "published": dict(self.published),
            "moved": self.moved.to_dict(orient="records"),
            "unlisted_fractured": list(self.unlisted_fractured),
            "listed_left_out": list(self.listed_left_out),
            "listed_not_fractured": list(self.listed_not_fractured),
            "largest_group": dict(self.largest_group),
            "kept": dict(self.kept),
            "kept_moved": self.kept_moved.to_dict(orient="records"),
            "kept_absent": self.kept_absent,
        }


class Splits(dict[str, pd.DataFrame]):
    """The frames keyed ``train``, ``val``, ``test``, with ``report`` saying how they were drawn.

    A plain dict to every caller that only wants the frames.
    """

    def __init__(self, frames: dict[str, pd.DataFrame], report: SplitReport) -> None:
        super().__init__(frames)
        self.report = report
        # What the split stage recorded in ASSIGNMENTS_FILE: added, moved and all rows (split.keep).
        self.recorded: tuple[int, int, int] | None = None


def split_manifest(
    manifest: pd.DataFrame,
    params: SplitParams,
    published_dir: Path | None = None,
    assigned: pd.DataFrame | None = None,
) -> Splits:
    """Splits the included images into train, val and test.

    The unit of every decision is a group: byte-identical files (same ``sha256``),
    near-duplicate X-rays (same ``near_duplicate_group``, where the manifest has it) and one
    patient's images (same ``patient_id``, where a hospital export's labels.csv or DICOM headers name it), joined
    transitively; a group goes to one split whole, and is stratified by its highest label.

    ``strategy: stratified`` draws the groups with scikit-learn's ``train_test_split``, seeded,
    ``test_size`` first and ``val_size`` of the whole from the rest, stratified by label; with
    ``stratify_body_part`` also by body part within each label. A group's body part is that of
    its first id (identical files are one film, so their flags agree), as
    :func:`fracture.manifest.body_part` derives it: the one region set, else ``mixed``, else
    ``unknown``.

    A (body part, label) stratum with fewer than ``ceil(1 / min(val_size, test_size))`` groups
    (7 at 0.15), too few to expect one group in every split, pools into the label's
    ``other parts`` stratum. Should a draw still be too small to hold one group of every
    stratum (scikit-learn's requirement), its smallest strata join the next smallest for that
    draw. Each label's share of a draw is fixed first (largest remainder), so class ratios are
    as close to the target as with label-only stratification.

    ``strategy: published`` places the images named by FracAtlas's published lists in
    ``published_dir`` (``train.csv``, ``valid.csv`` -> val, ``test.csv``; column
    ``image_id``). The lists name fractured images only, so every non-fractured image, and
    any fractured image no list names, is drawn as above from the groups no list places, with
    the same shares (so val and test hold ``val_size`` and ``test_size`` of those). Rules:

    * a group whose listed members sit in different lists follows the list of its first
      listed member (by ``image_id``), and an unlisted member follows its listed copies; both
      show in ``report.moved``;
    * ids a list names that are excluded (``included`` false) or absent from the manifest
      are left out (``report.listed_left_out``);
    * an included id a list names follows the list whatever its label
      (``report.listed_not_fractured`` names those labelled non-fractured).

    ``assigned`` (:func:`read_assignments`, with ``split.keep``) comes before either strategy: an
    included image it names by ``image_id``, else by ``sha256`` (a copy under a new name), stays
    in the split it records, whatever its label now, and its group with it. A group whose members
    are recorded in different splits (a new link joined them) goes to the one nearest test
    (test, then val, then train), and the members recorded elsewhere show in
    ``report.kept_moved``. Of the groups it places nothing of, test and then val take, per label,
    what their shares of all the groups lack among the kept ones (:func:`_fill`), and train the
    rest: when the export grows the earlier images keep their split, and the shares hold.

    Args:
        manifest: the validated manifest (``image_id``, ``included``, ``label``, ``sha256``;
            with ``stratify_body_part`` also the flags hand, leg, hip, shoulder and mixed).
        params: strategy, seed, the val and test shares and whether to stratify by body part.
        published_dir: the ``Utilities/Fracture Split`` folder; read only for ``published``.
        assigned: the recorded splits (``image_id``, ``sha256``, ``split``), or ``None``.

    Returns:
        The three frames, keyed ``train``, ``val``, ``test``, each sorted by ``image_id``;
        ``.report`` (:class:`SplitReport`) says what the lists placed, what moved and the
        per-stratum counts of the draw.

    Raises:
        SplitError: a duplicate group mixes labels, a class is too small to stratify (val or
            test would hold no image of it: neither ROC AUC nor a threshold can be scored on
            one class), the body-part flags are missing, or the published lists are missing
            or malformed.
    """
    if params.strategy not in {"stratified", "published"}:
        raise SplitError(f"split.strategy is {params.strategy!r}; set it to 'stratified' or 'published'")
    listed = _read_published(published_dir) if params.strategy == "published" else None
    used = manifest[manifest["included"]]
    used = used.assign(group=group_key(used))
    groups = _groups(used, params)
    kept, kept_found = (pd.Series(dtype=object), {}) if assigned is None else _place_kept(used, assigned)
    rest = used[~used["group"].isin(kept.index)]
    placed, found = (pd.Series(dtype=object), {}) if listed is None else _place_published(rest, listed, used)
    placed = pd.concat([kept, placed])
    drawn = groups.drop(index=placed.index)
    # Known before the draw: a group too large for val's or test's share is why a draw fails.
    largest = _largest(used, params)
    try:
        if not kept.empty:
            # Val and test take what their shares of all the groups lack, not their shares of the new;
            # as in a first split, the groups the published lists name are not counted.
            named = used.loc[used["image_id"].isin(listed.index), "group"] if listed is not None else []
            pool = groups.drop(index=placed.index.difference(kept.index).union(pd.Index(named)))
            drawn_where = _fill(pool, kept[kept.index.isin(pool.index)], params)
        elif listed is None and not params.stratify_body_part:
            # Label-only stratification: the two scikit-learn calls (test, then val from the rest).
            drawn_where = _label_only(drawn, params)
        else:
            drawn_where = _by_strata(drawn, params)
    except (SplitError, ValueError) as exc:
        if largest.get("above_share"):
            raise SplitError(f"cannot split the included images: {_too_large(largest, params)}") from exc
        raise

    assigned = used["group"].map(pd.concat([placed, drawn_where]))
    out = {name: used[assigned == name].sort_values("image_id").reset_index(drop=True) for name in SPLITS}
    _check_both_classes(out, used, params, largest, kept=not kept.empty)
    report = SplitReport(
        params.strategy, _strata_table(drawn, drawn_where), **found, **kept_found, largest_group=largest
    )
    return Splits(out, report)


def _too_large(largest: dict[str, Any], params: SplitParams) -> str:
    """Why no split can be drawn when the largest group of linked images is above a split's share."""
    return (
        f"{largest['images']} of the {largest['of']} included images are linked into one group (first id "
        f"{largest['first_id']}), more than split.val_size ({params.val_size}) or split.test_size ({params.test_size}) "
        "of them, so val or test cannot hold it. A patient_id (or DICOM Patient ID) shared by images of different "
        "patients, as an anonymiser's placeholder leaves it, or near-duplicate links "
        "(validate.near_duplicate_threshold) join them: give each image its own patient's id in labels.csv's "
        "patient_id column (an empty cell links nothing; the column is used instead of the DICOM headers), or raise "
        "validate.near_duplicate_threshold"
    )


def _check_both_classes(
    out: dict[str, pd.DataFrame],
    used: pd.DataFrame,
    params: SplitParams,
    largest: dict[str, Any] | None = None,
    kept: bool = False,
) -> None:
    """Raises :class:`SplitError` when val or test holds no image of a class.

    Rounding a class of few groups to val's or test's share can give it none there, and no
    stage says so until the train stage has spent an epoch and fails at ROC AUC on val (or the
    evaluate stage on test): refusing here names the cause while it can still be fixed. When the
    largest group of linked images (``largest``, :func:`_largest`) is above a split's share and
    holds most of the lacking class's images, that group is named as the cause, as more images or
    larger splits would not help. With images ``kept`` where :data:`ASSIGNMENTS_FILE` records
    them, larger splits only reach new images, so the message says how to draw afresh.
    """
    labels = used["label"].astype(int)
    whole = f"{int((labels == 1).sum())} fractured and {int((labels == 0).sum())} not fractured images included"
    for name in ("val", "test"):
        held = out[name]["label"].astype(int)
        counts = {label: int((held == label).sum()) for label in LABEL_NAMES}
        lacking = [LABEL_NAMES[label] for label, count in counts.items() if count == 0]
        if not lacking:
            continue
        what, kind = (f"the {lacking[0]} class is", f"{lacking[0]} ") if len(lacking) == 1 else ("both classes are", "")
        fix = f"add {kind}images, or raise split.{name}_size (now {getattr(params, f'{name}_size')})"
        if params.strategy == "published" and counts[1] == 0:
            fix += f", or name fractured images in the published {PUBLISHED_FILES[name]}"
        if kept:
            fix += (
                f"; the images {ASSIGNMENTS_FILE} records keep their split, so a larger split reaches only new "
                "images: to draw every image afresh, empty it to its header line (or set split.keep: false)"
            )
        if largest and largest["above_share"] and _holds_most(used, largest, [k for k, c in counts.items() if c == 0]):
            raise SplitError(
                f"the {name} split holds {counts[1]} fractured and {counts[0]} not fractured images: "
                f"{_too_large(largest, params)}"
            )
        raise SplitError(
            f"the {name} split holds {counts[1]} fractured and {counts[0]} not fractured images: {what} too small "
            f"to stratify ({whole}, in {used['group'].nunique()} groups), and the {name} split needs both classes "
            f"to score ROC AUC and a threshold; {fix}"
        )


def _holds_most(used: pd.DataFrame, largest: dict[str, Any], labels: list[int]) -> bool:
    """Whether the largest group holds at least half of the included images of one of ``labels``."""
    label = used["label"].astype(int)
    inside = used["group"] == largest["first_id"]
    return any(int((inside & (label == k)).sum()) * 2 >= int((label == k).sum()) for k in labels)


def _largest(used: pd.DataFrame, params: SplitParams) -> dict[str, Any]:
    """:attr:`SplitReport.largest_group`, with a warning in the log when it is above a split's share."""
    if used.empty:
        return {}
    sizes = used.groupby("group").size()
    images = int(sizes.max())
    above = images > min(params.val_size, params.test_size) * len(used)
    if above:
        log.warning("%s (%d of %d images, first id %s)", GROUP_TOO_LARGE, images, len(used), sizes.idxmax())
    return {"first_id": str(sizes.idxmax()), "images": images, "of": len(used), "above_share": bool(above)}


def published_dir_of(dataset_dir: Path) -> Path:
    """The published split lists' folder inside a FracAtlas folder."""
    return dataset_dir / PUBLISHED_SUBDIR


def group_key(used: pd.DataFrame) -> pd.Series:
    """Each image's group: byte-identical files, near-duplicates and one patient's images, joined transitively.

    The unit the split draws, and the unit cross-validation keeps in one fold
    (:mod:`fracture.crossval`).

    Args:
        used: the images, with ``image_id`` and, where known, ``sha256``,
            ``near_duplicate_group`` and ``patient_id`` (a hospital export's labels.csv or its
            DICOM files' Patient ID; a column that is absent, or an empty cell, links nothing).

    Returns:
        The group's first image id, per row of ``used`` (same index).
    """
    pairs = []
    for column in ("sha256", "near_duplicate_group", "patient_id"):
        if column in used:
            first = used.groupby(column)["image_id"].transform("min")  # NA where the cell is empty
            linked = first.notna() & (first != used["image_id"])
            pairs.append(pd.DataFrame({"image_id_a": first[linked], "image_id_b": used.loc[linked, "image_id"]}))
    ids = used["image_id"].tolist()
    pairs_frame = pd.concat(pairs) if pairs else pd.DataFrame({"image_id_a": [], "image_id_b": []})
    return used["image_id"].map(group_ids(ids, pairs_frame))


def split_groups(frame: pd.DataFrame) -> np.ndarray:
    """Each image's group of linked images in a split table: the unit ROC AUC's bootstrap
    resamples, and the unit the Wilson intervals and the gate's DeLong test count as evidence.

    The table's ``group`` column (:func:`group_key` over every included image; a group goes to
    one split whole); a table written before the split recorded it gets the same key computed on
    its own rows, which hold each of their groups whole.
    """
    if "group" in frame.columns and frame["group"].notna().all():
        return frame["group"].astype(str).to_numpy()
    return group_key(frame).astype(str).to_numpy()


def _groups(used: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """One row per group (index ``group``): ``label`` (its highest), ``first_id`` and ``stratum``."""
    ordered = used.sort_values("image_id")
    identical = ordered.groupby("sha256")["label"].nunique()
    mixed = identical.index[identical > 1]
    if len(mixed):
        ids = used.loc[used["sha256"].isin(mixed), "image_id"].tolist()
        raise SplitError(
            f"identical files carry different labels: {ids}; fix the labels in dataset.csv and the "
            "class folders, or set validate.on_duplicate: keep_one (keeps the first id of each group)"
        )
    # Near-duplicates with different labels reach here only with on_near_duplicate_conflict: keep.
    groups = ordered.groupby("group").agg(label=("label", "max"), first_id=("image_id", "first"))
    groups["label"] = groups["label"].astype(int)
    if params.stratify_body_part:
        try:
            parts = body_part(ordered)
        except ManifestError as exc:
            raise SplitError(f"{exc}, or set split.stratify_body_part: false") from exc
        groups["part"] = parts.groupby(ordered["group"]).first()
        groups["stratum"] = _pool_rare(groups, _min_groups(params))
    else:
        groups["part"] = "any"
        groups["stratum"] = groups["label"].map(LABEL_NAMES)
    return groups


def _min_groups(params: SplitParams) -> int:
    # Fewest groups for which the smallest split can expect one; round() so that float noise in
    # a share cannot add a group.
    return max(2, math.ceil(round(1 / min(params.val_size, params.test_size), 9)))


def _pool_rare(groups: pd.DataFrame, min_groups: int) -> pd.Series:
    """``"<part>, <label name>"`` per group, rare parts pooled into ``"other parts, ..."``."""
    sizes = groups.groupby(["part", "label"])["first_id"].transform("size")
    part = groups["part"].where(sizes >= min_groups, OTHER_PARTS)
    return part + ", " + groups["label"].map(LABEL_NAMES)


def _label_only(groups: pd.DataFrame, params: SplitParams) -> pd.Series:
    """The split per group, stratified by label over all groups at once."""
    keys = groups.index.to_numpy()
    labels = groups["label"].to_numpy()
    try:
        rest, test = train_test_split(keys, test_size=params.test_size, stratify=labels, random_state=params.seed)
        rest_labels = groups.loc[rest, "label"].to_numpy()
        train, val = train_test_split(
            rest,
            test_size=params.val_size / (1 - params.test_size),
            stratify=rest_labels,
            random_state=params.seed,
        )
    except ValueError as exc:
        raise SplitError(
            f"cannot split {len(keys)} distinct images stratified by label: {exc}; add images of the smaller "
            "class, or raise split.val_size and split.test_size so that val and test can each hold one of its groups"
        ) from exc
    return pd.concat([pd.Series(name, index=members) for name, members in zip(SPLITS, (train, val, test), strict=True)])


def _by_strata(groups: pd.DataFrame, params: SplitParams) -> pd.Series:
    """The split per group: label shares fixed first, then a stratified draw within each label."""
    where = pd.Series("train", index=groups.index, dtype=object)
    test = _draw(groups, params.test_size, params.seed)
    where[test] = "test"
    rest = groups.drop(index=test)
    val = _draw(rest, params.val_size / (1 - params.test_size), params.seed)
    where[val] = "val"
    return where


def _fill(pool: pd.DataFrame, kept: pd.Series, params: SplitParams) -> pd.Series:
    """The split per group of ``pool`` that ``kept`` does not place: test, then val, takes of each
    label what its share of the pool's groups of that label (rounded) lacks among the kept ones,
    and train the rest.

    So a few new images at a time go where the shares are short, mostly to train, rather than each
    draw rounding val's and test's share of the new images up; over many small ingests each
    split's share of every label stays as asked. Kept groups never move, so a split already
    above its share (a smaller ``test_size`` since) takes no new group.

    Args:
        pool: one row per group (``label``, ``stratum``), the kept groups and those to draw.
        kept: the split of each kept group (index: group).
        params: the shares and the seed.
    """
    drawn = pool.drop(index=kept.index)
    where = pd.Series("train", index=drawn.index, dtype=object)
    kept_labels = pool.loc[kept.index, "label"]
    for name, share in (("test", params.test_size), ("val", params.val_size)):
        counts = {}
        for label, total in pool["label"].value_counts().sort_index().items():
            have = int(((kept == name) & (kept_labels == label)).sum())
            available = int((drawn["label"] == label).sum())
            counts[label] = min(max(0, math.floor(share * total + 0.5) - have), available)
        picked = _draw_counts(drawn, pd.Series(counts, dtype=int), params.seed)
        where[picked] = name
        drawn = drawn.drop(index=picked)
    return where


def _draw(groups: pd.DataFrame, share: float, seed: int) -> list[str]:
    """Keys of ``share`` of the groups, each label's count fixed, stratified within each label."""
    # scikit-learn's own rounding for a float test_size, so both strategies size splits alike.
    n_draw = math.ceil(share * len(groups))
    return _draw_counts(groups, _apportion(n_draw, groups["label"].value_counts().sort_index()), seed)


def _draw_counts(groups: pd.DataFrame, counts: pd.Series, seed: int) -> list[str]:
    """Keys of ``counts[label]`` groups of each label, stratified by ``stratum`` within each label."""
    drawn: list[str] = []
    for label, count in counts.items():
        members = groups[groups["label"] == label]
        if count == 0:
            continue
        if count == len(members):
            drawn.extend(members.index)
            continue
        strata = _feasible(members["stratum"], count)
        _, picked = train_test_split(
            members.index.to_numpy(),
            test_size=count,
            stratify=strata.to_numpy() if strata.nunique() > 1 else None,
            random_state=seed,
        )
        drawn.extend(picked)
    return drawn


def _apportion(total: int, sizes: pd.Series) -> pd.Series:
    """Largest-remainder shares of ``total`` in proportion to ``sizes`` (ties by index order)."""
    if sizes.sum() == 0:
        return sizes * 0
    quotas = sizes * total / sizes.sum()
    counts = np.floor(quotas).astype(int)
    extra = (quotas - counts).sort_values(ascending=False, kind="stable").index[: total - int(counts.sum())]
    counts[extra] += 1
    return counts


def _feasible(strata: pd.Series, count: int) -> pd.Series:
    """Merges the smallest strata until scikit-learn can stratify a draw of ``count``.

    It needs two groups in every stratum and at least as many groups as strata on each side.
    """
    strata = strata.copy()
    room = min(count, len(strata) - count)
    while True:
        sizes = sorted(strata.value_counts().items(), key=lambda kv: (kv[1], kv[0]))
        if len(sizes) == 1 or (sizes[0][1] >= 2 and len(sizes) <= room):
            return strata
        # The next smallest absorbs it: the large strata, which carry the balance, stay pure.
        strata = strata.replace(sizes[0][0], sizes[1][0])


def _read_published(published_dir: Path | None) -> pd.Series:
    """The published lists as one split name per image id."""
    fix = "or set split.strategy: stratified"
    if published_dir is None:
        raise SplitError(
            "split.strategy is 'published' but no published lists folder was given; pass the "
            f"dataset's '{PUBLISHED_SUBDIR}' folder {fix}"
        )
    if not published_dir.is_dir():
        raise SplitError(
            f"{published_dir} not found: split.strategy: published needs FracAtlas's published lists "
            f"({', '.join(PUBLISHED_FILES.values())}) there; restore the folder {fix}"
        )
    frames = []
    for name, file in PUBLISHED_FILES.items():
        path = published_dir / file
        if not path.is_file():
            raise SplitError(
                f"{path} not found: split.strategy: published needs the {name} list there; "
                f"restore it {fix}"
            )
        frame = pd.read_csv(path, dtype=str)
        if "image_id" not in frame:
            raise SplitError(
                f"{path}: no 'image_id' column (columns: {list(frame.columns)}); the published lists "
                f"have a header line 'image_id' and one id per row; restore the file {fix}"
            )
        frames.append(pd.DataFrame({"image_id": frame["image_id"].dropna().str.strip(), "split": name}))
    listed = pd.concat(frames, ignore_index=True).drop_duplicates()
    twice = listed.loc[listed["image_id"].duplicated(keep=False)].sort_values(["image_id", "split"])
    if len(twice):
        named = ", ".join(f"{r.image_id} ({r.split})" for r in twice.itertuples())
        raise SplitError(f"{published_dir}: ids named in two lists: {named}; keep each id in one list {fix}")
    return listed.set_index("image_id")["split"]


def _place_published(
    used: pd.DataFrame, listed: pd.Series, included: pd.DataFrame | None = None
) -> tuple[pd.Series, dict[str, Any]]:
    """The split of each group a list places (by ``group``), and the report's list fields.

    ``used`` holds the groups the lists may place; ``included`` (default ``used``) every included
    image, so that an id placed otherwise (kept where it was recorded) is not reported as left out.
    """
    included = used if included is None else included
    rows = used.sort_values("image_id").assign(listed=lambda f: f["image_id"].map(listed))
    # A group follows its first listed member; the rest of it comes along.
    group_split = rows.dropna(subset=["listed"]).groupby("group")["listed"].first()
    rows["assigned"] = rows["group"].map(group_split)
    placed = rows.dropna(subset=["assigned"])
    moved = placed.loc[placed["listed"] != placed["assigned"], ["image_id", "listed", "assigned"]]
    fractured = rows["label"].astype(int) == 1
    return group_split, {
        "published": {name: int((placed["assigned"] == name).sum()) for name in SPLITS},
        "moved": moved.fillna({"listed": ""}).reset_index(drop=True),
        "unlisted_fractured": tuple(rows.loc[fractured & rows["listed"].isna(), "image_id"]),
        "listed_left_out": tuple(sorted(set(listed.index) - set(included["image_id"]))),
        "listed_not_fractured": tuple(rows.loc[~fractured & rows["listed"].notna(), "image_id"]),
    }


def _place_kept(used: pd.DataFrame, assigned: pd.DataFrame) -> tuple[pd.Series, dict[str, Any]]:
    """The split of each group :data:`ASSIGNMENTS_FILE` places (by ``group``), and the report's fields."""
    by_id = assigned.drop_duplicates("image_id").set_index("image_id")["split"]
    # A content recorded under several ids (a renamed copy that moved nearer test with a new link)
    # is looked up in its row nearest test, not the first by id.
    contents = assigned[assigned["sha256"].fillna("") != ""]
    by_content = contents.assign(rank=contents["split"].map(_NEAREST_TEST)).sort_values(
        ["rank", "image_id"], kind="stable").drop_duplicates("sha256").set_index("sha256")["split"]
    # An image recorded in several splits (its name and its content in different rows, a new link
    # joining groups) goes to the one nearest test, and its group with it: no later model may
    # train on an image an earlier one was tested on, and the gate leaves out of the comparison
    # the test images the champion trained on.
    rows = used.sort_values("image_id")
    ranks = pd.concat([rows["image_id"].map(by_id).map(_NEAREST_TEST),
                       rows["sha256"].map(by_content).map(_NEAREST_TEST)], axis=1).min(axis=1)
    rows = rows.assign(recorded=ranks.map(dict(enumerate(_BY_NEAREST_TEST))))
    recorded = rows.dropna(subset=["recorded"])
    group_split = recorded.assign(rank=ranks).sort_values(["rank", "image_id"], kind="stable").groupby(
        "group")["recorded"].first()
    rows["assigned"] = rows["group"].map(group_split)
    placed = rows.dropna(subset=["assigned"])
    moved = placed.loc[placed["recorded"].notna() & (placed["recorded"] != placed["assigned"])]
    found: dict[str, Any] = {"kept_absent": len(set(by_id.index) - set(used["image_id"]))}
    if not group_split.empty:
        found["kept"] = {name: int((placed["assigned"] == name).sum()) for name in SPLITS}
        found["kept_moved"] = moved[["image_id", "recorded", "assigned"]].reset_index(drop=True)
    return group_split, found


def read_assignments(path: Path) -> pd.DataFrame:
    """The recorded splits in ``path`` (:data:`ASSIGNMENTS_FILE`): ``image_id``, ``sha256``, ``split``.

    A missing or empty file records nothing (an empty frame). ``sha256`` may be empty.

    Raises:
        SplitError: the file cannot be read, lacks a column, names a split other than train,
            val or test, or names an id twice.
    """
    if not path.is_file() or path.stat().st_size == 0:  # 0 bytes: a first write that never finished
        return pd.DataFrame(columns=list(ASSIGNMENT_COLUMNS), dtype=str)
    fix = (
        f"restore it from git (git checkout -- {path.name}), or set split.keep: false to draw every image afresh"
    )
    try:
        # index_col=False: a row with a trailing comma (a spreadsheet's) is read by its header, not
        # shifted by one column; fields past the header's, which nothing reads, are dropped.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False, skip_blank_lines=False)
    except (OSError, ValueError) as exc:
        raise SplitError(f"{path}: cannot be read as CSV ({exc}); {fix}") from exc
    missing = [c for c in ("image_id", "split") if c not in frame.columns]
    if missing:
        raise SplitError(
            f"{path}: no {' or '.join(repr(c) for c in missing)} column (columns: {list(frame.columns)}); "
            f"its header is {','.join(ASSIGNMENT_COLUMNS)}; {fix}"
        )
    if "sha256" not in frame.columns:
        frame["sha256"] = ""
    frame = frame[list(ASSIGNMENT_COLUMNS)].apply(lambda column: column.str.strip())
    # Blank lines read as empty rows, so that a row's index gives its line number; then dropped.
    frame = frame[(frame != "").any(axis=1)]
    wrong = frame[~frame["split"].isin(SPLITS) | (frame["image_id"] == "")]
    if len(wrong):
        rows = ", ".join(f"line {i + 2} ({r.image_id!r}: {r.split!r})" for i, r in zip(wrong.index[:5], wrong.itertuples()))
        raise SplitError(
            f"{path}: {len(wrong)} rows name no image id or a split other than {', '.join(SPLITS)}: {rows}; {fix}"
        )
    twice = sorted(frame.loc[frame["image_id"].duplicated(), "image_id"].unique())
    if twice:
        raise SplitError(f"{path}: ids named twice: {', '.join(twice[:10])}; keep one row per id, or {fix}")
    return frame.reset_index(drop=True)


def keep_assignments(
    path: Path, tables: dict[str, pd.DataFrame], recorded: pd.DataFrame | None = None
) -> tuple[int, int, int]:
    """Records in ``path`` the split of each image of ``tables``: the rows of images it does not
    name yet are added, those in another split now are moved, and those whose file holds other
    bytes now take its new sha256; the other rows stay (images left out of this export keep their
    split for when they return).

    The split stage calls it with the split it drew with the file (``split.keep``), which keeps
    every recorded image where it was but for the groups a new link joined, which go nearer test:
    so a recorded split only ever moves nearer test. The file is replaced whole at once, so a
    failed write leaves the old one.

    Args:
        path: :data:`ASSIGNMENTS_FILE` in the project.
        tables: a split's frames keyed ``train``, ``val``, ``test`` (``image_id``, ``sha256``).
        recorded: the file as :func:`read_assignments` read it for this split, which is not
            changed; ``None``: read it here.

    Returns:
        The rows added, the rows moved, and the rows the file now holds.
    """
    recorded = read_assignments(path) if recorded is None else recorded.copy()
    split = pd.concat(
        [table.reindex(columns=["image_id", "sha256"]).assign(split=name) for name, table in tables.items()],
        ignore_index=True,
    ).fillna("").drop_duplicates("image_id").set_index("image_id")
    now = split["split"].reindex(recorded["image_id"]).to_numpy()
    moved = pd.notna(now) & (now != recorded["split"].to_numpy())
    # An image whose file was exported again with other bytes is recorded with what it holds now:
    # renamed later, it is still found by its content (the bytes this split's model was scored on).
    content = split["sha256"].reindex(recorded["image_id"]).fillna("").to_numpy()
    rewritten = (content != "") & (content != recorded["sha256"].fillna("").to_numpy())
    new = split.loc[~split.index.isin(recorded["image_id"])].reset_index()
    if new.empty and not moved.any() and not rewritten.any():
        return 0, 0, len(recorded)
    recorded.loc[moved, "split"] = now[moved]
    recorded.loc[rewritten, "sha256"] = content[rewritten]
    merged = pd.concat([recorded, new[list(ASSIGNMENT_COLUMNS)]], ignore_index=True).sort_values(
        "image_id", kind="stable"
    )
    path.touch(exist_ok=True)  # created with the umask's permissions, which replace_text then keeps
    replace_text(path, lambda out: merged.to_csv(out, index=False, lineterminator="\n"))
    return len(new), int(moved.sum()), len(merged)


def _strata_table(drawn: pd.DataFrame, where: pd.Series) -> pd.DataFrame:
    """Groups per stratum and split for the groups of the seeded draw."""
    if drawn.empty:
        return pd.DataFrame(columns=["stratum", "label", "parts", "groups", *SPLITS])
    frame = drawn.assign(split=where.reindex(drawn.index))
    counts = pd.crosstab(frame["stratum"], frame["split"]).reindex(columns=list(SPLITS), fill_value=0)
    info = frame.groupby("stratum").agg(
        label=("label", "first"), parts=("part", lambda s: ", ".join(sorted(set(s)))), groups=("label", "size")
    )
    table = info.join(counts).reset_index()
    return table.astype({c: int for c in ("label", "groups", *SPLITS)})[
        ["stratum", "label", "parts", "groups", *SPLITS]
    ]
