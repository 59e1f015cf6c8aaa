"""The DICOM display pipeline per stored level (fracture.dicom.to_display) against per pixel.

Both sides run in one process on the same 20-megapixel synthetic detector images (4000 x 5000),
decoded before timing: the product's table read (the pipeline once per stored level between the
image's minimum and maximum, then the image read through that table) and the same pipeline on
every pixel (fracture.dicom._display_values on the whole array, as the code did before). Prints
whether the pixels are identical, the peak memory each side allocates (tracemalloc) and its
seconds, from the second of two runs, and the ratio.

    python -m bench.dicom_display [--height 5000] [--width 4000]
"""

from __future__ import annotations

import argparse
import io
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fracture.dicom import _display_values, to_display
from tests.dicom_files import _dataset, to_bytes

CASES = ("12-bit window + rescale", "16-bit signed, negative slope, window", "MONOCHROME1 VOI LUT",
         "12-bit, no window (own range)")


def per_pixel(ds: Dataset) -> np.ndarray:
    return _display_values(ds.pixel_array, ds, ds.pixel_array)


def make(kind: str, rng: np.random.Generator, height: int = 5000, width: int = 4000) -> bytes:
    ds = _dataset()
    if kind == CASES[0]:
        ds.set_pixel_data(rng.integers(0, 4096, (height, width), dtype=np.uint16), "MONOCHROME2", 12)
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 900, 3000
    elif kind == CASES[1]:
        ds.set_pixel_data(rng.integers(-20000, 20000, (height, width), dtype=np.int16), "MONOCHROME2", 16)
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = -0.5, 100, 0, 15000
    elif kind == CASES[2]:
        ds.set_pixel_data(rng.integers(0, 4096, (height, width), dtype=np.uint16), "MONOCHROME1", 12)
        item = Dataset()
        item.LUTDescriptor, item.LUTData = [4096, 0, 16], [v * 16 for v in range(4096)]
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = Sequence([item])
    else:
        ds.set_pixel_data(rng.integers(300, 3000, (height, width), dtype=np.uint16), "MONOCHROME2", 12)
    return to_bytes(ds)


def measure(display: Callable[[Dataset], np.ndarray], data: bytes) -> tuple[np.ndarray, float, float]:
    """The display values, peak MB allocated and seconds, with the pixels decoded beforehand."""
    ds = dcmread(io.BytesIO(data))
    ds.pixel_array  # noqa: B018 - decoded before measuring: both sides start from the array
    tracemalloc.start()
    started = time.perf_counter()
    out = display(ds)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=5000, help="rows of each synthetic image")
    parser.add_argument("--width", type=int, default=4000, help="columns of each synthetic image")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'case':40s} {'same':>5s} {'per-pixel MB':>12s} {'per-level MB':>12s} {'per-pixel s':>11s} "
          f"{'per-level s':>11s} {'ratio':>6s}")
    for kind in CASES:
        data = make(kind, rng, args.height, args.width)
        for _ in range(2):  # the second run is reported
            pixel, pixel_mb, pixel_s = measure(per_pixel, data)
            level, level_mb, level_s = measure(to_display, data)
        print(f"{kind:40s} {np.array_equal(pixel, level)!s:>5s} {pixel_mb:12.0f} {level_mb:12.0f} {pixel_s:11.2f} "
              f"{level_s:11.2f} {pixel_s / level_s:5.1f}x")


if __name__ == "__main__":
    main()
