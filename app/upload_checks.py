"""Checks an uploaded file before the model sees it, and says in plain words what is wrong.

The checks are the served model's own (:func:`fracture.intake.read_xray`, with the
:class:`~fracture.intake.InputPolicy` the model was registered with): an upload the page
accepts is one the model scores, and a refusal here is the answer any other consumer of the
model gets for the same bytes. The page adds its own upload limit and names the file.
"""

from __future__ import annotations

from fracture.dicom import is_dicom
from fracture.intake import InputPolicy, InputRejected, Xray, over_limit, read_xray

WHAT_TO_DO = "Upload an X-ray exported as an 8-bit JPG or PNG, or its DICOM file."
TOO_LARGE_DICOM = ("Export the image from the PACS JPEG-compressed (lossless JPEG, JPEG-LS or JPEG 2000), or as an "
                   "8-bit JPG or PNG, and upload that.")


class UploadRejected(ValueError):
    """The upload cannot be analysed; the message says why and what to upload instead."""


def check_upload(name: str, data: bytes, policy: InputPolicy, max_bytes: int | None = None) -> Xray:
    """Decodes and checks one uploaded file.

    Args:
        name: the file name, used in messages.
        data: the file's bytes.
        policy: the served model's input checks (``ServedModel.config.input``).
        max_bytes: the page's upload limit, or ``None``.

    Returns:
        The decoded X-ray (RGB), its format and mode, and what was done to it.

    Raises:
        UploadRejected: the file is over the page's limit or fails one of the model's checks;
            the message names the file, the problem and what to upload instead.
    """
    if max_bytes is not None and len(data) > max_bytes:
        # In bytes where a rounded size would read as the limit itself ("20.0 MiB; the limit is 20 MiB").
        shown, limit = over_limit(len(data), max_bytes, 2**20, 1, "MiB", "bytes")
        # A DICOM file over it is told how to make it smaller, not to upload the DICOM file it is.
        fix = TOO_LARGE_DICOM if is_dicom(data[:132]) else WHAT_TO_DO
        raise UploadRejected(f"{name} is {shown}; the limit is {limit}. {fix}")
    try:
        return read_xray(data, policy)
    except InputRejected as exc:
        raise UploadRejected(f"{name} {exc}") from exc
