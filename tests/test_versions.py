"""Comparison with the previous dataset version, on throwaway git + DVC projects.

Each test works on its own copy, under ``tmp_path``, of a project built once per module
(``git init``, ``dvc init``, a tiny FracAtlas-layout ``data/fracatlas``, ``dvc add data``,
commit), and runs the real git and DVC.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from fracture.manifest import build_manifest
from fracture.versions import (
    STATUS_COMPARED,
    STATUS_FIRST,
    STATUS_UNAVAILABLE,
    compare_with_previous,
    dvc_file_md5,
    previous_version,
    read_version,
)
from tests.conftest import dvc, run
from tests.synthetic import FLAGS, make_dataset, write_image

# make_dataset(root, 3, 4): IMG0000000-2 fractured, 3-6 not; body part by i % 4 (hand, leg,
# hip, shoulder); every image frontal only.
N_FRACTURED, N_NON = 3, 4


def isolate(monkeypatch: pytest.MonkeyPatch, base: Path) -> None:
    """Keeps git and DVC away from the user's config and DVC's machine-wide site cache."""
    for var in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{var}_NAME", "test")
        monkeypatch.setenv(f"{var}_EMAIL", "test@example.com")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(base / "dvc-site-cache"))
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(base / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(base / "dvc-system"))


@pytest.fixture(autouse=True)
def isolated_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate(monkeypatch, tmp_path)


def commit(root: Path, message: str) -> str:
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", message)
    return run(root, "git", "rev-parse", "HEAD").strip()


def dataset(root: Path) -> Path:
    return root / "data" / "fracatlas"


def add_image(root: Path, image_id: str, fractured: int, **flags: int) -> None:
    """Files a new image in its class folder and appends its dataset.csv row."""
    folder = "Fractured" if fractured else "Non_fractured"
    write_image(dataset(root) / "images" / folder / image_id, seed=int(image_id[3:10]))
    csv = pd.read_csv(dataset(root) / "dataset.csv")
    row = {"image_id": image_id, **{f: 0 for f in FLAGS}, "fractured": fractured, "fracture_count": fractured}
    csv = pd.concat([csv, pd.DataFrame([row | flags])], ignore_index=True)
    csv.to_csv(dataset(root) / "dataset.csv", index=False)


def remove_image(root: Path, image_id: str) -> None:
    """Deletes an image and its dataset.csv row."""
    for path in (dataset(root) / "images").glob(f"*/{image_id}"):
        path.unlink()
    csv = pd.read_csv(dataset(root) / "dataset.csv")
    csv[csv["image_id"] != image_id].to_csv(dataset(root) / "dataset.csv", index=False)


def manifest(root: Path) -> pd.DataFrame:
    return build_manifest(dataset(root), workers=1)


@pytest.fixture(scope="module")
def first_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project whose first dataset version is committed, built once per module."""
    base = tmp_path_factory.mktemp("first-version")
    root = base / "project"
    root.mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(monkeypatch, base)
        run(root, "git", "init", "-q", "-b", "main")
        dvc(root, "init", "-q")
        make_dataset(dataset(root), N_FRACTURED, N_NON)
        dvc(root, "add", "-q", "data")
        commit(root, "dataset v1")
    return root


@pytest.fixture()
def project(first_version: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`first_version` (git and DVC keep no absolute paths in it)."""
    root = tmp_path / "project"
    shutil.copytree(first_version, root, symlinks=True)
    return root


def test_first_version_is_reported_not_raised(project: Path) -> None:
    md5 = dvc_file_md5(project)
    head = run(project, "git", "rev-parse", "HEAD").strip()

    result = compare_with_previous(manifest(project), project)

    assert md5 and md5.endswith(".dir")
    assert result["status"] == STATUS_FIRST
    assert result["previous"] is None
    assert result["current"]["md5"] == md5
    assert result["current"]["commit"] == head
    assert result["current"]["counts"]["class"] == {"not_fractured": N_NON, "fractured": N_FRACTURED}
    assert previous_version(project, md5) is None
    json.dumps(result)


def test_outside_git_is_a_first_version(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data" / "fracatlas", 2, 2)

    result = compare_with_previous(build_manifest(tmp_path / "data" / "fracatlas", workers=1), tmp_path)

    assert result["status"] == STATUS_FIRST
    assert "not in a git repository" in result["message"], result["message"]
    assert result["current"]["md5"] is None
    assert previous_version(tmp_path, None) is None


def relabel_in_csv(project: Path, image_id: str, fractured: int) -> None:
    """Sets an image's label in the project's dataset.csv, its file left where it is."""
    csv = pd.read_csv(dataset(project) / "dataset.csv")
    csv.loc[csv["image_id"] == image_id, "fractured"] = fractured
    csv.to_csv(dataset(project) / "dataset.csv", index=False)


def test_uncommitted_version_reports_new_removed_and_changed_ids(project: Path) -> None:
    v1_commit, v1_md5 = run(project, "git", "rev-parse", "HEAD").strip(), dvc_file_md5(project)
    remove_image(project, "IMG0000000.jpg")  # fractured, hand, frontal
    add_image(project, "IMG0000100.jpg", 1, shoulder=1, lateral=1)
    add_image(project, "IMG0000101.jpg", 0, hand=1, frontal=1, oblique=1)
    # IMG0000004 (hand, frontal) moves from Non_fractured to Fractured.
    shutil.move(dataset(project) / "images/Non_fractured/IMG0000004.jpg", dataset(project) / "images/Fractured")
    relabel_in_csv(project, "IMG0000004.jpg", 1)
    dvc(project, "add", "-q", "data")

    result = compare_with_previous(manifest(project), project)

    assert result["status"] == STATUS_COMPARED, result["message"]
    assert result["current"] == {"md5": dvc_file_md5(project), "commit": None, "counts": result["current"]["counts"]}
    assert result["previous"]["md5"] == v1_md5 != result["current"]["md5"]
    assert result["previous"]["commit"] == v1_commit
    assert result["new_ids"] == ["IMG0000100.jpg", "IMG0000101.jpg"]
    assert result["removed_ids"] == ["IMG0000000.jpg"]
    assert result["class_changed"] == [
        {"image_id": "IMG0000004.jpg", "previous": "not_fractured", "current": "fractured"}
    ]
    assert (result["n_new"], result["n_removed"], result["n_class_changed"]) == (2, 1, 1)
    assert result["csv_label_changed"] == [
        {"image_id": "IMG0000004.jpg", "previous": "not_fractured", "current": "fractured"}
    ]
    assert result["previous"]["counts"] == {
        "images": 7,
        "class": {"not_fractured": 4, "fractured": 3},
        "body_part": {"hand": 2, "leg": 2, "hip": 2, "shoulder": 1, "mixed": 0},
        "view": {"frontal": 7, "lateral": 0, "oblique": 0},
    }
    assert result["difference"] == {
        "images": 1,
        "class": {"not_fractured": 0, "fractured": 1},
        "body_part": {"hand": 0, "leg": 0, "hip": 0, "shoulder": 1, "mixed": 0},
        "view": {"frontal": 0, "lateral": 1, "oblique": 1},
    }
    json.loads(json.dumps(result))  # JSON-ready without a default= fallback

    # A previous version in another layout is reported, not raised, and fetching is no cure.
    elsewhere = compare_with_previous(manifest(project), project, dataset_subdir="elsewhere")
    assert elsewhere["status"] == STATUS_UNAVAILABLE
    assert "data/elsewhere" in elsewhere["message"] and "dvc fetch" not in elsewhere["message"]


@pytest.mark.parametrize("entry", ["a broken link", "a FIFO"])
def test_an_entry_that_is_no_file_to_read_is_not_opened_to_compare_its_content(project: Path, entry: str) -> None:
    """An image of the previous version turned into a link whose target is gone, or a FIFO: the
    manifest excludes it with its reason without opening it, but the comparison opened it, and the
    stage stopped on "[Errno 2] No such file or directory", or waited on the FIFO forever."""
    add_image(project, "IMG0000100.jpg", 1, shoulder=1, lateral=1)
    dvc(project, "add", "-q", "data")
    commit(project, "dataset v2")
    path = dataset(project) / "images/Non_fractured/IMG0000005.jpg"  # in both versions; since broken on disk
    path.unlink()
    if entry == "a broken link":
        path.symlink_to(path.with_name("gone.jpg"))
    else:
        os.mkfifo(path)
    rows = manifest(project)
    assert not rows.set_index("image_id").at["IMG0000005.jpg", "decodable"]
    result = compare_with_previous(rows, project)
    assert result["status"] == STATUS_COMPARED, result["message"]
    assert "IMG0000005.jpg" not in result["new_ids"] + result["removed_ids"]


def test_a_label_changed_in_the_csv_alone_is_reported(project: Path) -> None:
    """Under validate.on_label_conflict: csv the csv's label is the one trained on: a relabel there,
    the file left in its folder, is a change of the data too."""
    relabel_in_csv(project, "IMG0000004.jpg", 1)
    dvc(project, "add", "-q", "data")

    result = compare_with_previous(manifest(project), project)

    assert result["status"] == STATUS_COMPARED, result["message"]
    assert result["n_class_changed"] == 0
    assert result["csv_label_changed"] == [
        {"image_id": "IMG0000004.jpg", "previous": "not_fractured", "current": "fractured"}
    ]
    assert "0 changed class folder, 1 changed label in the csv" in result["message"]


def test_committed_version_compares_with_the_one_before(project: Path) -> None:
    v1 = run(project, "git", "rev-parse", "HEAD").strip(), dvc_file_md5(project)
    add_image(project, "IMG0000100.jpg", 1, leg=1, frontal=1)
    dvc(project, "add", "-q", "data")
    v2 = commit(project, "dataset v2"), dvc_file_md5(project)
    (project / "README.md").write_text("a commit that leaves data.dvc alone\n")
    head = commit(project, "docs")

    # Committed: the newest commit holds the current md5, so the previous one is v1.
    committed = compare_with_previous(manifest(project), project)
    assert previous_version(project, v2[1]) == v1
    assert (committed["previous"]["commit"], committed["previous"]["md5"]) == v1
    assert committed["current"]["commit"] == v2[0] != head
    assert (committed["new_ids"], committed["removed_ids"]) == (["IMG0000100.jpg"], [])

    # A further uncommitted change compares with v2, not v1.
    remove_image(project, "IMG0000001.jpg")
    dvc(project, "add", "-q", "data")
    further = compare_with_previous(manifest(project), project)
    assert (further["previous"]["commit"], further["previous"]["md5"]) == v2
    assert further["current"]["commit"] is None
    assert (further["new_ids"], further["removed_ids"]) == ([], ["IMG0000001.jpg"])
    assert further["difference"]["class"] == {"not_fractured": 0, "fractured": -1}


def test_uncached_previous_version_is_unavailable_with_a_fetch_hint(project: Path, tmp_path: Path) -> None:
    v1_commit = run(project, "git", "rev-parse", "HEAD").strip()
    add_image(project, "IMG0000100.jpg", 1)
    dvc(project, "add", "-q", "data")
    assert compare_with_previous(manifest(project), project)["status"] == STATUS_COMPARED

    # DVC remembers directory listings in its site cache, so with only the cache gone the
    # listing still loads and reading dataset.csv fails; with both gone the listing fails.
    shutil.rmtree(project / ".dvc" / "cache")
    for_csv = compare_with_previous(manifest(project), project)
    shutil.rmtree(tmp_path / "dvc-site-cache")
    for_listing = compare_with_previous(manifest(project), project)

    for result in (for_csv, for_listing):
        assert result["status"] == STATUS_UNAVAILABLE
        assert result["previous"]["commit"] == v1_commit
        assert "dvc fetch" in result["message"] and "dvc pull" in result["message"]
        assert v1_commit[:12] in result["message"]
        assert result["current"]["counts"]["images"] == N_FRACTURED + N_NON + 1
        assert "new_ids" not in result
    assert "dataset.csv" in for_csv["message"]


def test_uncached_previous_version_streams_from_a_remote_added_later(project: Path, tmp_path: Path) -> None:
    # The remote is configured only after v1 was committed; DVC opens v1 with the config
    # committed then, so the working tree's remotes have to be lent to it.
    dvc(project, "remote", "add", "-q", "-d", "store", str(tmp_path / "remote"))
    dvc(project, "push", "-q")
    remove_image(project, "IMG0000002.jpg")
    dvc(project, "add", "-q", "data")
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(tmp_path / "dvc-site-cache")

    result = compare_with_previous(manifest(project), project)

    assert result["status"] == STATUS_COMPARED, result["message"]
    assert result["removed_ids"] == ["IMG0000002.jpg"]


def test_read_version_matches_the_manifest_of_the_same_data(project: Path) -> None:
    head = run(project, "git", "rev-parse", "HEAD").strip()
    columns = ["image_id", "path", "folder_label", "csv_label", "hand", "lateral"]

    committed = read_version(project, head)

    pd.testing.assert_frame_equal(committed[columns], manifest(project)[columns])


def test_a_previous_dataset_csv_that_cannot_be_read_is_reported_with_its_line(project: Path) -> None:
    # v1 as committed had a word where a label belongs; v2 (the current data) fixes it.
    csv_file = dataset(project) / "dataset.csv"
    good = csv_file.read_text()
    lines = good.splitlines()
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index("fractured")] = "yes"
    csv_file.write_text("\n".join([*lines[:2], ",".join(cells), *lines[3:]]) + "\n")
    dvc(project, "add", "-q", "data")
    v1 = commit(project, "dataset v1 with a word for a label")
    csv_file.write_text(good)
    dvc(project, "add", "-q", "data")

    result = compare_with_previous(manifest(project), project)

    assert result["status"] == STATUS_UNAVAILABLE
    assert result["previous"]["commit"] == v1
    message = result["message"]
    assert f"{v1[:12]}:data/fracatlas/dataset.csv: column fractured" in message, message
    assert "line 3 ('yes')" in message and "validate.compare_previous: false" in message
    assert "Fix those cells" not in message  # that commit's file is history


def test_manifest_without_needed_columns_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="folder_label"):
        compare_with_previous(pd.DataFrame({"image_id": ["a.jpg"]}), tmp_path)


@pytest.mark.integration  # a real `dvc repro` in a fresh process that imports torch: ~15 s here
def test_runs_inside_a_dvc_repro_stage(project: Path) -> None:
    # The validate stage calls this while `dvc repro` holds the project's lock.
    (project / "compare.py").write_text(
        "import json\n"
        "from pathlib import Path\n"
        "from fracture.manifest import build_manifest\n"
        "from fracture.versions import compare_with_previous\n"
        "result = compare_with_previous(build_manifest(Path('data/fracatlas'), workers=1), Path('.'))\n"
        "Path('report.json').write_text(json.dumps(result))\n"
    )
    (project / "dvc.yaml").write_text(
        f"stages:\n  validate:\n    cmd: '\"{sys.executable}\" compare.py'\n"
        "    deps: [data, compare.py]\n    outs: [report.json]\n"
    )
    remove_image(project, "IMG0000003.jpg")
    dvc(project, "add", "-q", "data")

    dvc(project, "repro", "-q")

    result = json.loads((project / "report.json").read_text())
    assert result["status"] == STATUS_COMPARED, result["message"]
    assert result["removed_ids"] == ["IMG0000003.jpg"]


def test_a_hidden_file_in_a_past_versions_class_folder_is_no_image(project: Path) -> None:
    """A Finder .DS_Store that a past version held in a class folder is no X-ray there either:
    the manifest skips it now, so the comparison must not report it removed."""
    (dataset(project) / "images" / "Fractured" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    dvc(project, "add", "-q", "data")
    commit(project, "dataset v2: a .DS_Store copied in with the images")
    (dataset(project) / "images" / "Fractured" / ".DS_Store").unlink()
    dvc(project, "add", "-q", "data")

    result = compare_with_previous(manifest(project), project)

    assert result["status"] == STATUS_COMPARED, result["message"]
    assert (result["removed_ids"], result["new_ids"]) == ([], [])
    assert result["previous"]["counts"]["images"] == result["current"]["counts"]["images"] == 7
