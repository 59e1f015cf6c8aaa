"""The detector's mAP bootstrap: a COCO evaluation per resample vs each image's matches made once.

    .venv/bin/python -m bench.map_bootstrap [--images 490 --fractured 84] [--resamples 200] [--per-image 20]

The detect stage's mAP intervals and the detector's promotion gate resample the test images
(:func:`fracture.detection.bootstrap_map`, :func:`fracture.detection.paired_bootstrap_map`).
Before, every resample was a torchmetrics COCO evaluation of the resampled images (pycocotools
matching every detection again). Now each image's detections are matched to its boxes once
(:class:`fracture.detection.MatchedImages`) and each resample only ranks those matches. Both
sides run here on the same resamples of the same detections, and the bench prints each side's
seconds, the ratio, and the largest difference between the mAP@0.5 and mAP@0.5:0.95 the two give
for any resample (torchmetrics returns float32, so up to its last digit).

The detections are synthetic, shaped as the detect stage's test split gives them: ``--images``
X-rays, ``--fractured`` of them with one to three fracture boxes, and ``--per-image`` scored boxes
on every image (the detector keeps its 20 best, ``detections_per_img``), some on a fracture at
overlaps from a near miss to exact, the rest elsewhere. Speed depends on the counts, not on the
pixels.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from fracture.detection import (
    Detections,
    MatchedImages,
    _resampled_images,
    mean_average_precision,
)


def detector_like(n_images: int, n_fractured: int, per_image: int, seed: int) -> tuple[Detections, list[np.ndarray]]:
    """Boxes and ``per_image`` scored detections per image, as the detector returns its best boxes."""
    rng = np.random.default_rng(seed)
    truth, boxes, scores = [], [], []
    for i in range(n_images):
        n_true = int(rng.integers(1, 4)) if i < n_fractured else 0
        corner = rng.uniform(0, 1000, (n_true, 2))
        true = np.hstack([corner, corner + rng.uniform(40, 200, (n_true, 2))]).astype(np.float32)
        found = [t + rng.normal(0, 0.1, 4) * np.tile(t[2:] - t[:2], 2) for t in true if rng.random() < 0.7]
        corner = rng.uniform(0, 1000, (per_image - len(found), 2))
        found += list(np.hstack([corner, corner + rng.uniform(40, 200, corner.shape)]))
        truth.append(true.reshape(-1, 4))
        boxes.append(np.array(found, dtype=np.float32).reshape(-1, 4))
        n_on = len(found) - len(corner)
        scores.append(np.r_[rng.uniform(0.3, 1.0, n_on), rng.uniform(0.01, 0.6, len(corner))].astype(np.float32))
    return Detections(boxes, scores), truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=490, help="test images (the main job's test split: 490)")
    parser.add_argument("--fractured", type=int, default=84, help="of them with fracture boxes")
    parser.add_argument("--per-image", type=int, default=20, help="scored boxes per image (the detector keeps 20)")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples (params: detect.bootstrap_resamples)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    detections, truth = detector_like(args.images, args.fractured, args.per_image, args.seed)
    draws = list(_resampled_images(truth, args.resamples, args.seed))
    print(f"{args.images} images ({args.fractured} with boxes), {args.per_image} detections each; "
          f"{args.resamples} stratified resamples, the same on both sides")

    warnings.filterwarnings("ignore", message="Encountered more than")
    # One resample of each side first, not counted: torchmetrics is imported on the first COCO
    # evaluation (about 1.5 s), a cost that would fall on the per-resample side alone.
    mean_average_precision(Detections([detections.boxes[i] for i in draws[0]],
                                      [detections.scores[i] for i in draws[0]]), [truth[i] for i in draws[0]])
    MatchedImages.of(detections, truth).maps(draws[0])
    started = time.perf_counter()
    each = []
    for idx in draws:
        figures = mean_average_precision(Detections([detections.boxes[i] for i in idx],
                                                    [detections.scores[i] for i in idx]), [truth[i] for i in idx])
        each.append((figures["map_50"], figures["map"]))
    per_resample = time.perf_counter() - started

    started = time.perf_counter()
    matched = MatchedImages.of(detections, truth)
    matching = time.perf_counter() - started
    once = [matched.maps(idx) for idx in draws]
    matched_once = time.perf_counter() - started

    gap = np.abs(np.array(each) - np.array(once)).max(axis=0)
    print(f"a COCO evaluation per resample (torchmetrics): {per_resample:7.2f} s "
          f"({1000 * per_resample / len(draws):.1f} ms a resample)")
    print(f"matched once, ranked per resample:            {matched_once:7.2f} s "
          f"(matching {matching:.2f} s, then {1000 * (matched_once - matching) / len(draws):.2f} ms a resample)")
    print(f"ratio: {per_resample / matched_once:.1f}x as fast; largest difference of a resample's mAP@0.5 "
          f"{gap[0]:.1e}, of its mAP@0.5:0.95 {gap[1]:.1e}")
    for k, name in enumerate(("mAP@0.5", "mAP@0.5:0.95")):
        a, b = (np.percentile([f[k] for f in side], [2.5, 97.5]) for side in (each, once))
        print(f"{name} 95% interval: {a[0]:.4f}-{a[1]:.4f} per resample, {b[0]:.4f}-{b[1]:.4f} matched once")


if __name__ == "__main__":
    main()
