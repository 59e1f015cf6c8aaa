"""The prepared cache: decoded once, exactly the served model's pixels, rebuilt when its key changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from fracture.data_config import DataConfig
from fracture.decoding import open_xray
from fracture.imaging import Preprocessor, build_transform
from fracture.prepare import StaleCacheError, cache_key, open_prepared, prepare_images
from tests.synthetic import make_dataset, training_frame, truncate

CONFIG = DataConfig((3, 48, 48), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), aspect="squash")


def tensor_data(root: Path, frame: pd.DataFrame, config: DataConfig) -> TensorDataset:
    """The frame's images decoded straight from their files (no cache), with labels."""
    images = Preprocessor(config).load([root / p for p in frame["path"]], allow_truncated=True, workers=1)
    return TensorDataset(images, torch.tensor(frame["label"].astype(int).to_numpy()))


def build(root: Path, frame: pd.DataFrame, config: DataConfig = CONFIG, allow_truncated: bool = True) -> Path:
    out = root / f"cache-{config.aspect}"
    prepare_images(frame, root, Preprocessor(config), allow_truncated, out, workers=2)
    return out


def test_cache_holds_exactly_the_decoded_pixels_in_frame_order(tmp_path):
    make_dataset(tmp_path, 4, 6)
    frame = training_frame(tmp_path)
    out = build(tmp_path, frame)
    cache = open_prepared(out, cache_key(CONFIG, True))
    shuffled = frame.sample(frac=1, random_state=3).reset_index(drop=True)
    cached = cache.dataset(shuffled)
    decoded = tensor_data(tmp_path, shuffled, CONFIG)
    assert cached.tensors[0].dtype == torch.uint8 and cached.tensors[0].shape == (10, 3, 48, 48)
    assert torch.equal(cached.tensors[0], decoded.tensors[0])
    assert torch.equal(cached.tensors[1], decoded.tensors[1])
    # The reader training epochs use: a batch of positions in one gather, single images alike.
    reader = cache.reader(shuffled)
    assert len(reader) == 10
    images, labels = reader[[7, 2, 9]]
    assert torch.equal(images, decoded.tensors[0][[7, 2, 9]]) and torch.equal(labels, decoded.tensors[1][[7, 2, 9]])
    image, label = reader[4]
    assert torch.equal(image, decoded.tensors[0][4]) and int(label) == int(decoded.tensors[1][4])
    assert images.is_contiguous(memory_format=torch.channels_last)  # the layout the network runs in


def test_training_from_the_cache_reader_equals_training_from_memory(tmp_path):
    import dataclasses as dc

    from fracture.config import load_params
    from fracture.model import profile_data_config
    from fracture.training import train
    from tests.conftest import REPO

    make_dataset(tmp_path, 6, 8)
    params = load_params(REPO)
    profile = dc.replace(params.profiles["cpu"], image_size=32, epochs=1, frozen=())
    config = profile_data_config(profile)
    frame = training_frame(tmp_path)
    cache = open_prepared(build(tmp_path, frame, config), cache_key(config, True))
    train_params = dc.replace(params.train, batch_size=4)
    from_reader = train(cache.reader(frame), cache.dataset(frame), config, profile, train_params)
    from_memory = train(cache.dataset(frame), cache.dataset(frame), config, profile, train_params)
    for key, value in from_memory.model.state_dict().items():
        assert torch.equal(from_reader.model.state_dict()[key], value), key


def test_cached_pixels_normalised_equal_the_served_transform(tmp_path):
    make_dataset(tmp_path, 2, 2)
    frame = training_frame(tmp_path)
    cache = open_prepared(build(tmp_path, frame), cache_key(CONFIG, True))
    pre = Preprocessor(CONFIG)
    batch = pre(cache.dataset(frame).tensors[0])
    for i, path in enumerate(frame["path"]):
        served = build_transform(CONFIG)(open_xray(tmp_path / path))
        assert torch.allclose(batch[i], served, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [{"input_size": (3, 64, 64)}, {"aspect": "pad"}, {"interpolation": "bilinear"}, {"enhance": "clahe"},
     {"decode": "draft"}],
    ids=["size", "aspect", "interpolation", "enhance", "decode"],
)
def test_a_cache_built_for_another_key_is_refused(tmp_path, change):
    make_dataset(tmp_path, 2, 2)
    out = build(tmp_path, training_frame(tmp_path))
    with pytest.raises(StaleCacheError, match="dvc repro prepare"):
        open_prepared(out, cache_key(dataclasses.replace(CONFIG, **change), True))
    with pytest.raises(StaleCacheError, match="dvc repro prepare"):
        open_prepared(out, cache_key(CONFIG, False))


def test_a_file_replaced_under_the_same_id_makes_the_cache_stale(tmp_path):
    """Ids name images, bytes are images: a new export may hold another X-ray under an old id, and
    training on the cached pixels would then not be training on the file the model is served."""
    import hashlib

    make_dataset(tmp_path, 2, 2)
    frame = training_frame(tmp_path)
    frame["sha256"] = [hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for p in frame["path"]]
    out = build(tmp_path, frame)
    cache = open_prepared(out, cache_key(CONFIG, True))
    assert len(cache.dataset(frame)) == len(frame)  # the same files: accepted
    replaced = tmp_path / frame["path"].iloc[1]
    with Image.open(replaced) as img:
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(replaced)
    frame.loc[1, "sha256"] = hashlib.sha256(replaced.read_bytes()).hexdigest()  # as the validate stage lists it
    for read in (cache.dataset, cache.reader):
        with pytest.raises(StaleCacheError, match=f"1 images changed .*{frame['image_id'].iloc[1]}.*dvc repro prepare"):
            read(frame)
    # A cache that recorded no checksums cannot vouch for the files either.
    (out / "index.csv").write_text(pd.read_csv(out / "index.csv").drop(columns="sha256").to_csv(index=False))
    with pytest.raises(StaleCacheError, match="records no checksum"):
        open_prepared(out, cache_key(CONFIG, True)).dataset(frame)


def test_missing_cache_and_unknown_ids_say_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        open_prepared(tmp_path / "nowhere", cache_key(CONFIG, True))
    make_dataset(tmp_path, 2, 2)
    frame = training_frame(tmp_path)
    cache = open_prepared(build(tmp_path, frame.iloc[:3]), cache_key(CONFIG, True))
    with pytest.raises(StaleCacheError, match=frame["image_id"].iloc[3]):
        cache.dataset(frame)


def test_truncated_file_needs_truncated_loading_and_a_failed_rebuild_leaves_no_cache(tmp_path):
    make_dataset(tmp_path, 2, 2)
    frame = training_frame(tmp_path)
    truncate(tmp_path / frame["path"].iloc[0])
    out = build(tmp_path, frame, allow_truncated=True)
    assert open_prepared(out, cache_key(CONFIG, True)).images.shape[0] == 4
    # A rebuild that fails halfway leaves no cache that a reader would accept.
    with pytest.raises(ValueError, match=frame["image_id"].iloc[0]):
        build(tmp_path, frame, allow_truncated=False)
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        open_prepared(out, cache_key(CONFIG, True))


def test_pad_keeps_the_aspect_ratio_and_serving_pads_the_same_way(tmp_path):
    # A white 40 x 120 image: squashed it fills the square, padded it is a centred bar.
    Image.new("L", (40, 120), 255).save(tmp_path / "tall.png")
    frame = pd.DataFrame({"image_id": ["tall.png"], "path": ["tall.png"], "label": [1]})
    pad = dataclasses.replace(CONFIG, aspect="pad")
    squashed = open_prepared(build(tmp_path, frame), cache_key(CONFIG, True)).images[0]
    padded = open_prepared(build(tmp_path, frame, pad), cache_key(pad, True)).images[0]
    assert squashed.min() == 255
    assert padded[:, :10].max() == 0 and padded[:, -10:].max() == 0  # black sides
    assert padded[:, 20:28].min() == 255  # the image, 16 px wide, in the middle
    served = build_transform(pad)(open_xray(tmp_path / "tall.png"))
    cached = Preprocessor(pad)(torch.from_numpy(np.array(padded)).permute(2, 0, 1)[None])[0]
    assert torch.allclose(cached, served, atol=1e-6)


def test_draft_decoding_caches_the_pixels_the_served_model_reads(tmp_path):
    """With ``decode: draft``, the cache and a served request decode a JPEG at the same reduced
    scale: the cached pixels equal those of the pyfunc's row path (``read_row`` with the model's
    draft size, then its resize), and differ from a full decode's."""
    from fracture.intake import InputPolicy
    from fracture.serving import read_row

    Image.fromarray(np.random.default_rng(2).integers(0, 256, (500, 400), dtype=np.uint8), mode="L").save(
        tmp_path / "large.jpg", quality=90
    )
    frame = pd.DataFrame({"image_id": ["large.jpg"], "path": ["large.jpg"], "label": [1]})
    draft = dataclasses.replace(CONFIG, decode="draft")
    cached = open_prepared(build(tmp_path, frame, draft), cache_key(draft, True)).images[0]
    row = pd.Series({"image": (tmp_path / "large.jpg").read_bytes()})
    xray = read_row(0, row, None, InputPolicy(), draft.draft_size)
    assert xray.image.size == (50, 63)  # 1/8 of 400 x 500 (rounded up) still covers 48 x 48
    np.testing.assert_array_equal(cached, np.asarray(Preprocessor(draft).resize(xray.image)))
    full = Preprocessor(CONFIG).load([tmp_path / "large.jpg"], allow_truncated=False, workers=1)[0]
    assert not np.array_equal(cached, full.permute(1, 2, 0).numpy())


def test_a_build_stopped_by_an_undecodable_file_names_it_the_same_every_run_and_leaves_no_partial_array(tmp_path):
    """A file that went bad after validation stops the build, named with a reason free of Pillow's
    buffer address, and neither the half-written array nor a cache a reader would accept is left."""
    from fracture.decoding import ImageLoadError

    make_dataset(tmp_path, 4, 6)
    frame = training_frame(tmp_path)
    out = build(tmp_path, frame)
    bad = tmp_path / frame["path"].iloc[3]
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageLoadError) as raised:
        build(tmp_path, frame)
    assert str(raised.value) == f"{bad}: not a decodable image (it is not an image file that can be read (JPEG, PNG or DICOM))"
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "index.csv"]  # no meta.json: no cache is accepted
    with pytest.raises(FileNotFoundError, match="run `dvc repro prepare` first"):
        open_prepared(out, cache_key(CONFIG, True))
