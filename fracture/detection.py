"""Where is the fracture: a detector whose backbone is the trained classifier's network.

The paper's future scope: the classifier's network as the backbone of a region localisation model,
trained on FracAtlas's fracture boxes. The backbone is timm's ``features_only`` form of the
classifier's architecture, loaded with the classifier's fine-tuned weights (strides 8, 16, 32);
torchvision's feature pyramid (plus P6 and P7) and its FCOS or RetinaNet head do the rest.

- Images keep their aspect: each is resized so its longer side is ``image_size`` (torchvision's
  own transform then leaves it as it is), and its boxes are scaled with it. Boxes come back in
  the original image's pixels.
- Non-fractured images are negatives (no boxes): each epoch trains on every image with boxes and
  ``negatives_per_positive`` times as many negatives, drawn afresh per epoch from a seeded
  generator.
- The backbone's batch norm is frozen (timm's ``freeze_batch_norm_2d``): detection batches are
  small, and the classifier's statistics are kept.
- Scored with COCO mean average precision (torchmetrics ``MeanAveragePrecision``, pycocotools)
  at IoU 0.5 and 0.5:0.95, with bootstrap intervals over groups of linked images (each image's
  detections matched to its boxes once, :class:`MatchedImages`), and as an image-level
  classifier whose score is the top box's.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import timm
import torch
from PIL import Image
from timm.layers import freeze_batch_norm_2d
from timm.utils.model import freeze
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.transforms.functional import pil_to_tensor

from fracture.decoding import open_xray
from fracture.ensemble import ensemble_size
from fracture.vocabulary import Detector

log = logging.getLogger(__name__)

#: The classifier's feature levels the pyramid reads (strides 8, 16, 32).
FEATURE_LEVELS = (2, 3, 4)
#: Detector class index of a fracture (torchvision's detection heads keep 0 for background).
FRACTURE = 1


class DetectionError(ValueError):
    """The detector cannot be built or trained as asked."""


@dataclass(frozen=True)
class DetectorConfig:
    """What rebuilds the detector around its weights (the detector's ``model.json``).

    Attributes:
        backbone: the classifier's timm architecture.
        architecture: ``fcos`` or ``retinanet`` (torchvision's heads).
        image_size: the longer side, in pixels, every image is resized to.
        fpn_channels: channels of the feature pyramid.
        mean: per-channel mean the pixels are normalised with (the classifier's).
        std: per-channel standard deviation.
    """

    backbone: str
    architecture: Detector
    image_size: int
    fpn_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.architecture not in get_args(Detector):
            raise DetectionError(f"detect.architecture must be one of {get_args(Detector)}, got {self.architecture!r}")
        if self.fpn_channels < 64 or self.fpn_channels % 32:
            # torchvision's FCOS and RetinaNet heads normalise with 32 groups: at 32 channels the
            # one-pixel P7 of a single small image leaves one value per group, which cannot be normalised.
            raise DetectionError(f"detect.fpn_channels must be a multiple of 32 and at least 64, got {self.fpn_channels}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        return cls(
            backbone=str(data["backbone"]), architecture=data["architecture"], image_size=int(data["image_size"]),
            fpn_channels=int(data["fpn_channels"]), mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


class TimmPyramid(nn.Module):
    """A timm ``features_only`` network under torchvision's feature pyramid, P3 to P7."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.feature_info.channels()), channels, extra_blocks=LastLevelP6P7(channels, channels)
        )
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((f"p{i}", f) for i, f in enumerate(self.body(x))))


#: The most boxes the detector keeps on one X-ray, its highest-scoring (torchvision's ``detections_per_img``).
MAX_DETECTIONS = 20


def build_detector(
    config: DetectorConfig, classifier_state: dict[str, torch.Tensor] | None = None, seed: int | None = None
) -> nn.Module:
    """The detector, its backbone loaded from the classifier's fine-tuned weights.

    Args:
        config: architecture and sizes.
        classifier_state: the classifier's state dict (``outputs/train/model.safetensors``); its
            head is left out, and of an ensemble's, every member but the first. None: the backbone
            starts untrained (for tests, and for rebuilding a saved detector before its own weights
            are loaded).
        seed: seeds the new layers' first weights (the feature pyramid and the head: ``detect.seed``),
            so that training again on the same data gives the same detector; ``None``: torch's state
            as it is (a saved detector's weights are loaded over them).

    Raises:
        DetectionError: the classifier's weights do not hold the backbone's tensors.
    """
    if seed is not None:
        torch.manual_seed(seed)
    body = timm.create_model(config.backbone, pretrained=False, features_only=True, out_indices=FEATURE_LEVELS)
    # Frozen before loading: frozen batch norm holds no batch counter, so the classifier's weights
    # load whether its own layers were trained (with counters) or frozen (without, the CPU profile's stem).
    body = freeze_batch_norm_2d(body)
    if classifier_state is not None and ensemble_size(classifier_state):
        # An ensemble's members share their frozen layers and differ above them: the first one is the backbone.
        classifier_state = {k.removeprefix("members.0."): v for k, v in classifier_state.items()
                            if k.startswith("members.0.")}
    if classifier_state is not None:
        wanted = body.state_dict()
        missing = [k for k in wanted if k not in classifier_state]
        if missing:
            raise DetectionError(
                f"the classifier's weights lack {len(missing)} of the {config.backbone} backbone's tensors (first: "
                f"{missing[0]}): train the classifier with that architecture, or set the detector's backbone to it"
            )
        body.load_state_dict({k: classifier_state[k] for k in wanted})
    pyramid = TimmPyramid(body, config.fpn_channels)
    common: dict[str, Any] = {
        "num_classes": FRACTURE + 1,
        # Images arrive with their longer side at image_size: torchvision's resize keeps them so.
        "min_size": config.image_size,
        "max_size": config.image_size,
        "image_mean": list(config.mean),
        "image_std": list(config.std),
        "score_thresh": 0.01,  # low, so the top box also ranks images the detector is unsure of
        "detections_per_img": MAX_DETECTIONS,
    }
    if config.architecture == "fcos":
        return FCOS(pyramid, **common)
    return RetinaNet(pyramid, **common)


def fit_longer_side(size: tuple[int, int], image_size: int) -> tuple[int, int]:
    """``(width, height)`` scaled so the longer side is ``image_size``, aspect kept."""
    width, height = size
    scale = image_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def detector_input(img: Image.Image, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """A decoded X-ray (L or RGB) as the detector's input, and the box scale from original pixels to it.

    The one preprocessing of training, evaluation and the served detector: resized so the longer
    side is ``image_size`` (bicubic, the grey channel first), then RGB, as a float CHW tensor in
    ``[0, 1]``; torchvision's transform inside the model normalises it.

    Returns:
        The tensor and ``[sx, sy, sx, sy]``: multiply original ``x0, y0, x1, y1`` by it to get
        the input's pixels, divide to go back.
    """
    size = img.size
    new = fit_longer_side(size, image_size)
    resized = img.resize(new, Image.Resampling.BICUBIC).convert("RGB")
    scale = np.array([new[0] / size[0], new[1] / size[1]] * 2, dtype=np.float32)
    return pil_to_tensor(resized).float().div_(255), scale


class BoxedImages(Dataset):
    """X-rays with their fracture boxes (none for a negative), resized to the detector's size.

    Items are ``(image, target)``: a float CHW tensor in ``[0, 1]`` and ``{"boxes", "labels"}``
    in the resized image's pixels, as torchvision's detection models take them.
    """

    def __init__(
        self, paths: Sequence[Path], boxes: Sequence[np.ndarray], image_size: int, flip: bool = False,
        allow_truncated: bool = False,
    ) -> None:
        if len(paths) != len(boxes):
            raise ValueError(f"{len(paths)} paths but {len(boxes)} box arrays")
        self.paths, self.boxes = list(paths), [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        self.image_size, self.flip, self.allow_truncated = image_size, flip, allow_truncated

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]]:
        """The resized image, its boxes in its pixels, and the original ``(width, height)``."""
        img = open_xray(self.paths[i], allow_truncated=self.allow_truncated, rgb=False)
        image, scale = detector_input(img, self.image_size)
        return image, self.boxes[i] * scale, img.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, boxes, _ = self.load(i)
        if self.flip and torch.rand(()) < 0.5:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        return image, {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.full((len(boxes),), FRACTURE, dtype=torch.int64),
        }


def _collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list, list]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def epoch_indices(has_boxes: np.ndarray, negatives_per_positive: float, rng: np.random.Generator) -> np.ndarray:
    """One epoch's images: every one with boxes, and a fresh draw of negatives, shuffled."""
    positives = np.flatnonzero(has_boxes)
    negatives = np.flatnonzero(~has_boxes)
    n_neg = min(len(negatives), math.ceil(negatives_per_positive * len(positives)))
    chosen = np.concatenate([positives, rng.choice(negatives, size=n_neg, replace=False)])
    return rng.permutation(chosen)


class _Loaded(Dataset):
    """``images``' items as :meth:`BoxedImages.load` gives them: the resized image, its boxes and
    its original size. A class of this module, not a lambda, so that worker processes started by
    spawn (macOS's and Windows' default, and CUDA users') can unpickle it."""

    def __init__(self, images: BoxedImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]]:
        return self.images.load(i)


@dataclass(frozen=True)
class Detections:
    """A detector's boxes and scores per image, in the original images' pixels."""

    boxes: list[np.ndarray]
    scores: list[np.ndarray]

    def top_scores(self) -> np.ndarray:
        """Each image's highest box score (0 without a box): the detector as an image classifier."""
        return np.array([float(s.max()) if len(s) else 0.0 for s in self.scores])


@torch.no_grad()
def fracture_boxes(model: nn.Module, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The fracture boxes the detector finds on one input image (in the input's pixels), and their scores.

    One image per forward pass, wherever the detector scores: torchvision pads a batch to its
    largest image, and the padding changes the boxes. Evaluation (:func:`detect`) and the served
    model both call this, so their boxes are the same. The image goes to the device the detector
    is on; the boxes come back to the CPU.
    """
    device = next(model.parameters()).device
    result = model([image.to(device)])[0]
    keep = result["labels"] == FRACTURE
    return result["boxes"][keep].cpu().numpy(), result["scores"][keep].cpu().numpy()


def detect(model: nn.Module, images: BoxedImages, batch_size: int = 8, workers: int = 0) -> Detections:
    """Runs the detector over every image (:func:`fracture_boxes`); boxes are mapped back to each image's own pixels.

    ``batch_size`` images are decoded at a time; each is scored on its own, as the served model does.
    """
    model.eval()
    out_boxes, out_scores = [], []
    loader = DataLoader(_Loaded(images), batch_size=batch_size, num_workers=workers, collate_fn=list)
    for batch in loader:
        for image, _, size in batch:
            boxes, scores = fracture_boxes(model, image)
            height, width = image.shape[-2:]
            out_boxes.append(boxes * np.array([size[0] / width, size[1] / height] * 2, dtype=np.float32))
            out_scores.append(scores)
    return Detections(out_boxes, out_scores)


def mean_average_precision(detections: Detections, truth: Sequence[np.ndarray]) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@0.5:0.95 (torchmetrics, pycocotools) over the images, negatives included.

    A negative image contributes its boxes as false positives; an image whose fracture is missed
    lowers the recall.
    """
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.update(*_coco_inputs(detections, truth))
    result = metric.compute()
    # mar_100 is COCO's recall with up to 100 detections an image; the detector keeps MAX_DETECTIONS (20).
    return {"map_50": float(result["map_50"]), "map": float(result["map"]), "mar_100": float(result["mar_100"])}


def _map_at(detections: Detections, truth: Sequence[np.ndarray], iou: float) -> float:
    """COCO mAP at one IoU threshold (torchmetrics): a tenth of the work of the 0.5:0.95 sweep."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[iou])
    metric.update(*_coco_inputs(detections, truth))
    return float(metric.compute()["map"])


def _coco_inputs(detections: Detections, truth: Sequence[np.ndarray]) -> tuple[list[dict], list[dict]]:
    """torchmetrics' predictions and targets: every box of the fracture class."""
    predicted = [
        {"boxes": torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4), "scores": torch.as_tensor(s, dtype=torch.float32),
         "labels": torch.full((len(s),), FRACTURE, dtype=torch.int64)}
        for b, s in zip(detections.boxes, detections.scores, strict=True)
    ]
    targets = [{"boxes": torch.as_tensor(t, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.full((len(t),), FRACTURE, dtype=torch.int64)} for t in truth]
    return predicted, targets


@dataclass(frozen=True)
class MatchedImages:
    """Each image's detections matched to its boxes once, as COCO matches them, for resampling.

    COCO matches a detection to a box within its own image (pycocotools' ``evaluateImg``); only
    the precision-recall curve is over all images. So a bootstrap resample, a list of image
    indices with repeats, needs no new matching: its curve is the images' matches put together in
    that order and ranked by score, as pycocotools' ``accumulate`` ranks them. This holds each
    image's matches from pycocotools, made once with torchmetrics' own IoU and recall
    thresholds, and :meth:`precision` ranks them for a resample: the same mAP torchmetrics gives
    on the resampled images, without a COCO evaluation per resample.

    Attributes:
        iou_thresholds: torchmetrics' default IoU thresholds (0.5:0.95).
        rec_thresholds: torchmetrics' recall thresholds (101).
        scores: per image, its detections' scores from high to low (at most 100, COCO's maxDets).
        matched: per image, (IoU thresholds, detections): matched to a box at that threshold.
        counted: per image, (IoU thresholds, detections): not ignored.
        n_boxes: per image, its boxes that count (not ignored).
    """

    iou_thresholds: np.ndarray
    rec_thresholds: np.ndarray
    scores: list[np.ndarray]
    matched: list[np.ndarray]
    counted: list[np.ndarray]
    n_boxes: np.ndarray

    @classmethod
    def of(cls, detections: Detections, truth: Sequence[np.ndarray]) -> MatchedImages:
        """Matches every image's detections to its boxes (pycocotools), with torchmetrics' settings."""
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        from torchmetrics.detection import MeanAveragePrecision
        from torchvision.ops import box_convert

        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        predicted, targets = _coco_inputs(detections, truth)

        def dataset(items: list[dict]) -> COCO:
            # As torchmetrics builds it: boxes as xywh from float32, ids from 1, every image listed.
            annotations = []
            for image_id, item in enumerate(items):
                boxes = box_convert(item["boxes"], "xyxy", "xywh").tolist() if len(item["boxes"]) else []
                scores = item["scores"].tolist() if "scores" in item else [None] * len(boxes)
                for box, score in zip(boxes, scores, strict=True):
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": box,
                                        "area": box[2] * box[3], "category_id": FRACTURE, "iscrowd": 0}
                                       | ({} if score is None else {"score": score}))
            coco = COCO()
            coco.dataset = {"images": [{"id": i} for i in range(len(items))], "annotations": annotations,
                            "categories": [{"id": FRACTURE, "name": "fracture"}]}
            coco.createIndex()
            return coco

        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(dataset(targets), dataset(predicted), iouType="bbox")
            p = evaluation.params
            p.iouThrs = np.array(metric.iou_thresholds, dtype=np.float64)
            p.recThrs = np.array(metric.rec_thresholds, dtype=np.float64)
            p.maxDets = [max(metric.max_detection_thresholds)]
            p.areaRng, p.areaRngLbl = [p.areaRng[p.areaRngLbl.index("all")]], ["all"]
            evaluation.evaluate()
        n_thresholds = len(p.iouThrs)
        scores, matched, counted, n_boxes = [], [], [], []
        for image in evaluation.evalImgs:  # one category, one area range: one entry per image, in order
            if image is None:  # neither boxes nor detections
                image = {"dtScores": [], "dtMatches": np.zeros((n_thresholds, 0)),
                         "dtIgnore": np.zeros((n_thresholds, 0)), "gtIgnore": np.zeros(0)}
            scores.append(np.asarray(image["dtScores"], dtype=np.float64))
            matched.append(np.asarray(image["dtMatches"]) > 0)
            counted.append(~np.asarray(image["dtIgnore"], dtype=bool))
            n_boxes.append(int(np.count_nonzero(np.asarray(image["gtIgnore"]) == 0)))
        return cls(p.iouThrs, p.recThrs, scores, matched, counted, np.array(n_boxes))

    def precision(self, idx: np.ndarray) -> np.ndarray:
        """COCO's interpolated precision, (IoU thresholds, recall thresholds), on the images ``idx``
        (repeats allowed, each a copy of the image); all -1 when none of them has a box."""
        n_boxes = int(self.n_boxes[idx].sum())
        out = np.zeros((len(self.iou_thresholds), len(self.rec_thresholds)))
        if n_boxes == 0:
            return out - 1
        scores = np.concatenate([self.scores[i] for i in idx])
        order = np.argsort(-scores, kind="mergesort")  # pycocotools' ranking, ties in image order
        matched = np.concatenate([self.matched[i] for i in idx], axis=1)[:, order]
        counted = np.concatenate([self.counted[i] for i in idx], axis=1)[:, order]
        tp = np.cumsum(matched & counted, axis=1, dtype=np.float64)
        fp = np.cumsum(~matched & counted, axis=1, dtype=np.float64)
        recall = tp / n_boxes
        # The precision envelope: at each rank the highest precision at this recall or beyond.
        envelope = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
        for t in range(len(out)):
            at = np.searchsorted(recall[t], self.rec_thresholds, side="left")
            reached = at < recall.shape[1]
            out[t, reached] = envelope[t, at[reached]]
        return out

    def maps(self, idx: np.ndarray) -> tuple[float, float]:
        """mAP@0.5 and mAP@0.5:0.95 on the images ``idx``, as torchmetrics computes them on those images."""
        precision = self.precision(idx)
        if (precision < 0).all():
            return -1.0, -1.0
        at_half = int(np.flatnonzero(self.iou_thresholds == 0.5)[0])
        return float(np.mean(precision[at_half])), float(np.mean(precision))


def _resampled_images(
    truth: Sequence[np.ndarray], n_resamples: int, seed: int, groups: Sequence[str] | None = None
) -> Iterator[np.ndarray]:
    """Stratified bootstrap draws of image indices: images with boxes and images without apart,
    so every resample keeps the number of fractured images (and an mAP is always defined).

    With ``groups`` (each image's group of linked images, the split's ``group``), each resample
    draws whole groups, as the classifier's intervals do (:func:`fracture.evaluation.group_resamples`):
    near-duplicates of one X-ray are one piece of evidence, not several.
    """
    if groups is not None and len(groups):
        from fracture.evaluation import group_resamples  # noqa: PLC0415 - scikit-learn and SciPy, for this alone

        if len(groups) != len(truth):
            raise DetectionError(f"one group per image is needed: {len(groups)} groups for {len(truth)} images")
        yield from group_resamples(np.array([len(t) > 0 for t in truth], dtype=int), np.asarray(groups),
                                   n_resamples, seed)
        return
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero([len(t) > 0 for t in truth]), np.flatnonzero([len(t) == 0 for t in truth])]
    for _ in range(n_resamples):
        yield np.concatenate([rng.choice(s, size=len(s)) for s in strata if len(s)])


@dataclass(frozen=True)
class PairedMAP:
    """Two detectors' mAP@0.5 on the same images and a paired bootstrap of their difference.

    Attributes:
        map_a: detector A's mAP@0.5.
        map_b: detector B's.
        difference: ``map_a - map_b``.
        ci_low: lower end of the difference's percentile interval at ``confidence``.
        ci_high: its upper end.
        p_value: two-sided bootstrap p-value of "no difference": twice the smaller share of
            resampled differences on either side of 0 (at least ``2 / (resamples + 1)``).
        confidence: the interval's coverage.
        resamples: bootstrap resamples.
        n_images: images both were scored on.
        n_fractured: images with boxes among them.
        measured: whether the bootstrap measured anything: ``False`` with fewer than two images (or
            groups of linked images) with boxes, which every resample draws alike, so each resample's
            difference is the observed one and its "interval" no width; then the interval is -1 to 1
            and the p-value 1, as DeLong's with too few images of a class.
    """

    map_a: float
    map_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float
    resamples: int
    n_images: int
    n_fractured: int
    measured: bool = True


def paired_bootstrap_map(
    truth: Sequence[np.ndarray], a: Detections, b: Detections, n_resamples: int, seed: int, confidence: float = 0.95,
    groups: Sequence[str] | None = None,
) -> PairedMAP:
    """The mAP@0.5 difference of two detectors on the same images, with a paired bootstrap.

    Each resample draws the same images for both (stratified as :func:`bootstrap_map`, over
    whole ``groups`` of linked images where they are given), so what the two share (easy and
    hard images) cancels in the difference.

    With fewer than two images (or groups) with boxes nothing is measured (:attr:`PairedMAP.measured`).
    With a few, a bootstrap that finds the same difference in every resample (one detector finding
    every box, the other none) still reads it as certain; a paired randomisation test, as the
    classifier's gate uses where DeLong's variance is 0, would be stricter there.
    """
    if not (len(truth) == len(a.boxes) == len(b.boxes)):
        raise DetectionError(f"paired detections need the same images: {len(truth)}, {len(a.boxes)} and {len(b.boxes)}")
    if n_resamples < 1:
        raise DetectionError(f"the paired bootstrap needs at least one resample, got {n_resamples}")
    map_a, map_b = _map_at(a, truth, 0.5), _map_at(b, truth, 0.5)
    boxed = [i for i, t in enumerate(truth) if len(t) > 0]
    linked = groups is not None and len(groups) == len(truth)  # other lengths: _resampled_images says so
    if len({groups[i] for i in boxed} if linked else boxed) < 2:  # type: ignore[index]
        # One image (or group) with boxes: every stratified resample draws it, so every difference is
        # the observed one, an interval of no width and p = 2 / (resamples + 1) on one image's evidence.
        return PairedMAP(map_a, map_b, map_a - map_b, -1.0, 1.0, 1.0, confidence, n_resamples, len(truth), len(boxed),
                         measured=False)
    matched_a, matched_b = MatchedImages.of(a, truth), MatchedImages.of(b, truth)
    diffs = np.array([
        matched_a.maps(idx)[0] - matched_b.maps(idx)[0] for idx in _resampled_images(truth, n_resamples, seed, groups)
    ])
    tail = (1 - confidence) / 2 * 100
    below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
    p_value = min(1.0, 2 * (min(below, above) + 1) / (n_resamples + 1))
    return PairedMAP(
        map_a, map_b, map_a - map_b, float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail)),
        p_value, confidence, n_resamples, len(truth), sum(len(t) > 0 for t in truth),
    )


def bootstrap_map(
    detections: Detections, truth: Sequence[np.ndarray], n_resamples: int, seed: int, confidence: float = 0.95,
    groups: Sequence[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of mAP@0.5 and mAP@0.5:0.95, resampling images.

    Stratified like the classifier's intervals: images with boxes and images without are
    resampled apart, so every resample keeps the number of fractured images (and an mAP is
    always defined); with ``groups``, each image's group of linked images, whole groups are
    resampled, as the classifier's are.
    """
    matched = MatchedImages.of(detections, truth)
    draws: dict[str, list[float]] = {"map_50": [], "map": []}
    for idx in _resampled_images(truth, n_resamples, seed, groups):
        map_50, map_all = matched.maps(idx)
        draws["map_50"].append(map_50)
        draws["map"].append(map_all)
    tail = (1 - confidence) / 2 * 100
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in draws.items()}


@dataclass(frozen=True)
class DetectorTraining:
    """The result of :func:`train_detector`."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_map_50: float
    history: list[dict[str, float]]
    seconds: float
    val_scores: np.ndarray  # each val image's top box score at the best epoch (0 without a box)


def train_detector(
    model: nn.Module,
    train: BoxedImages,
    val: BoxedImages,
    val_truth: Sequence[np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    negatives_per_positive: float,
    seed: int,
    workers: int = 0,
    frozen: Sequence[str] = (),
    warmup_epochs: float = 0.0,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    device: torch.device | str = "cpu",
) -> DetectorTraining:
    """Fine-tunes the detector; the epoch kept is the one with the best val mAP@0.5.

    AdamW with a cosine schedule over all steps, after a linear warm-up from a tenth of ``lr``
    over ``warmup_epochs`` (the new pyramid and head start from random weights, and large first
    steps through them would disturb the classifier's backbone). Every choice is made on the val
    split.

    Args:
        frozen: backbone modules kept as they are (timm's ``freeze``, e.g. ``blocks.0``): the
            high-resolution early layers, whose backward pass is most of a CPU step's cost.
        device: where the detector trains and scores val (``train.device``'s choice, as the
            classifier's); the kept weights are on the CPU.

    Raises:
        DetectionError: the training or the val split holds no image with a box.
    """
    has_boxes = np.array([len(b) > 0 for b in train.boxes])
    if not has_boxes.any():
        raise DetectionError("the training split holds no image with a fracture box; the detector has nothing to learn")
    if not any(len(t) > 0 for t in val_truth):
        # Its val mAP would be -1 at every epoch, the epoch kept for nothing, and detect_evaluate would fail
        # choosing the image threshold on val after the training's time was spent.
        raise DetectionError(
            "the val split holds no image with a fracture box, so no epoch can be chosen and no image threshold "
            "either: check that evaluate.boxes names the boxes of val's fractured images"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if frozen:
        try:
            freeze(model.backbone.body, list(frozen))
        except AttributeError as err:
            raise DetectionError(f"detect.frozen names a module the backbone lacks ({err}); name its modules as timm "
                                 "does, e.g. conv_stem, bn1, blocks.0") from err
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(epoch_indices(has_boxes, negatives_per_positive, np.random.default_rng(0))) / batch_size)
    total = max(1, epochs * per_epoch)
    warmup = min(total - 1, round(warmup_epochs * per_epoch))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total - warmup)
    schedule: torch.optim.lr_scheduler.LRScheduler = cosine
    if warmup > 0:
        ramp = torch.optim.lr_scheduler.LinearLR(optimiser, start_factor=0.1, total_iters=warmup)
        schedule = torch.optim.lr_scheduler.SequentialLR(optimiser, [ramp, cosine], milestones=[warmup])
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor], np.ndarray] | None = None
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = epoch_indices(has_boxes, negatives_per_positive, rng)
        loader = DataLoader(torch.utils.data.Subset(train, order.tolist()), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=_collate, drop_last=len(order) % batch_size == 1)
        losses = []
        for images, targets in loader:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) for k, v in target.items()} for target in targets]
            loss = sum(model(images, targets).values())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        found = detect(model, val, batch_size, workers)
        val_map = mean_average_precision(found, val_truth)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimiser.param_groups[0]["lr"],
               "val_map_50": val_map["map_50"], "val_map": val_map["map"], "seconds": time.perf_counter() - started}
        history.append(row)
        log.info("detector epoch %d: loss %.4f, val mAP@0.5 %.4f", epoch, row["train_loss"], row["val_map_50"])
        if on_epoch is not None:
            on_epoch(row)
        if best is None or row["val_map_50"] > best[0]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = (row["val_map_50"], epoch, state, found.top_scores())
    assert best is not None
    return DetectorTraining(best[2], best[1], best[0], history, time.perf_counter() - started, best[3])
