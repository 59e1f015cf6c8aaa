"""The clinician's page: upload an X-ray, see the registered model's answer and where it looked, and,
when a fracture detector is registered, its boxes with their scores.

Start it with ``make app`` (or ``cd app && streamlit run streamlit_app.py``, so that
``app/.streamlit/config.toml`` applies). Which models it serves is set by ``MLFLOW_TRACKING_URI``,
``FRACTURE_MODEL_NAME``, ``FRACTURE_MODEL_ALIAS`` and ``FRACTURE_DETECTOR_NAME`` (see :mod:`champion`).
"""

from __future__ import annotations

import html
import logging
import math
import re

import numpy as np
import streamlit as st
from champion import (
    AliasWatch,
    ModelUnavailable,
    PageSettings,
    RegistryUnreachable,
    ServedDetector,
    ServedModel,
    load_served_detector,
    load_served_model,
    resolve_detector,
    resolve_version,
    settings_from_env,
    test_figures,
)
from PIL import Image
from streamlit.delta_generator import DeltaGenerator
from upload_checks import UploadRejected, check_upload

from fracture.config import ConfigError
from fracture.detection import MAX_DETECTIONS
from fracture.dicom_sr import NOT_FOR_CLINICAL_USE
from fracture.explain import LEGEND_ENDS, LEGEND_TITLE, draw_boxes, with_legend
from fracture.tracking import bound_registry_waits

log = logging.getLogger("fracture.app")

# A page started during an outage waited about 4 minutes for its first answer: it retries twice and
# waits at most 30 s for a reply, then says the registry cannot be reached.
bound_registry_waits()

LABELS = {"fractured": "Fractured", "not_fractured": "Not fractured"}
# Shown images and heat maps are drawn at most this large; the model sees the full upload.
DISPLAY_SIDE = 1024
# The detector's highest-scoring boxes drawn on the X-ray; the caption counts every box at its threshold.
MAX_BOXES_DRAWN = 5
# Scores and thresholds are shown to 3 decimals, and to at most this many where 3 would show a
# score below its threshold as equal to it.
MAX_DECIMALS = 6
#: What Streamlit's Markdown reads as syntax: links and images, emphasis, code, its :color[...] directives,
#: :emoji: and :material/...: codes, $ for LaTeX, and & for HTML's entities (&amp; shown as &).
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$&])")
#: Unicode's bidirectional controls (marks, embeddings, overrides, isolates): inside a file's name
#: they turn the page's own text around it (a name with U+202E showed "1152 x 1440" as "2511 x 0441").
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(text: str) -> str:
    """``text`` as Streamlit shows it literally: every character its Markdown reads as syntax escaped,
    and bidirectional controls written out (``\\u202e``) rather than obeyed.

    For what the page does not write itself: an upload's name, a DICOM header's values in a model's
    note, an exception's message, a registry's error. Streamlit renders Markdown in alerts and
    captions, so a file named ``![x](https://host/t.png)`` made the clinician's browser fetch that
    address, and ``[Open the result](https://...)`` showed a link the page never wrote.
    """
    return _MARKDOWN.sub(r"\\\1", readable(text))


def readable(text: str) -> str:
    """``text`` with its bidirectional controls written out as ``\\u202e``: for an image's alt text,
    which is not Markdown, as for :func:`plain`."""
    return _BIDI_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


@st.cache_resource(show_spinner=False)
def classifier_alias(settings: PageSettings) -> AliasWatch:
    """The version the alias points to, looked up again at most every 30 s so a moved alias
    reaches the page without a restart; the version found last while the registry cannot be reached."""
    return AliasWatch(settings, resolve_version)


def release(model: ServedModel | ServedDetector) -> None:
    """Removes the files of a version the cache drops (the two it keeps keep theirs): each load
    downloads the version from the registry, and a page that runs for months sees many champions."""
    model.release()


@st.cache_resource(show_spinner="Loading the model from the registry ...", max_entries=2, on_release=release)
def served_model(settings: PageSettings, version: str, run_id: str) -> ServedModel:
    """One loaded model per registered version, shared by every browser session."""
    return load_served_model(settings, version, run_id)


@st.cache_resource(show_spinner=False)
def _test_figures(settings: PageSettings, name: str, version: str, threshold: float) -> str | None:
    return test_figures(settings, name, version, threshold)


def measured_at_threshold(settings: PageSettings, model: ServedModel) -> str | None:
    """What the served version's threshold means (:func:`champion.test_figures`), read once per
    version; a registry that cannot be read now gives none, and is asked again on the next rerun."""
    try:
        return _test_figures(settings, model.name, model.version, model.config.threshold)
    except Exception:  # noqa: BLE001 - the page serves without them
        log.warning("the test figures of %s version %s could not be read", model.name, model.version, exc_info=True)
        return None


@st.cache_resource(show_spinner=False)
def detector_alias(settings: PageSettings) -> AliasWatch:
    """The detector version at the page's alias (``None``: no detector registered), looked up again
    at most every 30 s; the version found last while the registry cannot be reached."""
    return AliasWatch(settings, resolve_detector)


def still_serving(what: str, version: str, unreachable: RegistryUnreachable) -> None:
    st.warning(f"{plain(str(unreachable))} The page goes on serving {what} version {version}, loaded when the registry last "
               "answered; it asks the registry again every 30 s.")


@st.cache_resource(show_spinner="Loading the fracture detector from the registry ...", max_entries=2,
                   on_release=release)
def served_detector(settings: PageSettings, version: str, run_id: str) -> ServedDetector:
    """One loaded detector per registered version and run: a detector deleted and registered again
    is version 1 again, but another run's model."""
    return load_served_detector(settings, version, run_id)


def the_detector(settings: PageSettings) -> ServedDetector | None:
    """The registered detector, or ``None`` (with a warning when one is registered but unusable):
    the classifier's answer never waits on it."""
    try:
        found, unreachable = detector_alias(settings).current()
        if found is not None and unreachable is not None:
            still_serving("the fracture detector's", found[0], unreachable)
        return None if found is None else served_detector(settings, *found)
    except ModelUnavailable as exc:
        st.warning(f"{plain(str(exc))} The page shows the classifier's answer without the detector's boxes.")
        return None


def against_threshold(score: float, threshold: float) -> tuple[str, str]:
    """``score`` and ``threshold`` as the page shows them, side by side.

    To 3 decimals, or more where 3 round a score below the threshold to the same figure: beside
    "Not fractured", "0.672" and "0.672" would contradict the rule the page states (the class is
    Fractured when the probability is at least the threshold). A score at or above its threshold
    never rounds below it, so only that side needs the care.

    Args:
        score: the fracture probability, or the detector's highest box score.
        threshold: the decision threshold it is compared with.

    Returns:
        The two as text; a score still equal to the threshold at :data:`MAX_DECIMALS` places
        beyond the threshold's first (or beyond 3) says it lies below it.
    """
    # A threshold under 0.001 (a val-chosen one can be 8e-06) starts with as many places as show
    # its first significant digits, and the score's beside it: "0.000" and "0.000" would tell nothing.
    first = 3 if threshold >= 0.001 or threshold <= 0 else 2 - math.floor(math.log10(threshold))
    last = first + MAX_DECIMALS - 3
    for places in range(first, last + 1):
        shown, limit = f"{score:.{places}f}", f"{threshold:.{places}f}"
        if score >= threshold or shown != limit:
            return shown, limit
    limit = f"{threshold:.{last}f}"
    return f"just below {limit}", limit


def members_of(model: ServedModel) -> int:
    """How many networks the model averages (``members`` in its ``model.json``; 1 for older models)."""
    return int(model.config.extra.get("members", 1))


def averaging_note(extra: dict, members: int) -> list[str]:
    """The sidebar's line on what the model averages: seeds, snapshots of one network, or nothing for one network."""
    epochs = extra.get("member_best_epochs") or []
    if members > 1 and int(extra.get("snapshots", 1)) > 1:
        return [f"- networks: the mean of {members} snapshots of one network, taken at the ends of its cosine cycles"
                + (f" (after epochs {', '.join(map(str, epochs))})" if epochs else "")]
    if members > 1:
        return [f"- networks: the mean of {members}, one recipe trained under different seeds"
                + (f" (best epochs {', '.join(map(str, epochs))})" if epochs else "")]
    return []


#: Streamlit draws captions (each image's: the X-ray's name and size, what the heat map's colours mean,
#: the detector's count and scores) in the body text at 60% opacity: #2F2D2B at 60% on its light
#: theme's white is 3.9:1, under WCAG AA's 4.5:1 for text of their size. At 80% they read 7.2:1 there
#: (6.6:1 on its greyest background, 10:1 on the dark theme's), still a step fainter than the body text.
CAPTION_OPACITY = 0.8
#: The page's own styling: one rule, on every state of the page; ``!important`` because Streamlit's
#: own rule for captions is added to the page after it.
PAGE_STYLE = f'<style>[data-testid="stCaptionContainer"] {{ opacity: {CAPTION_OPACITY} !important; }}</style>'

#: Keeps the live region's text off the screen (the metrics show it) but in the page a screen reader reads.
_VISUALLY_HIDDEN = ("position:absolute;width:1px;height:1px;margin:-1px;padding:0;overflow:hidden;"
                    "clip:rect(0,0,0,0);white-space:nowrap;border:0")


def announce(text: str) -> None:
    """Writes the page's polite live region, holding ``text`` (empty: nothing to announce).

    Streamlit's elements appear silently: a screen reader user uploaded an X-ray and heard nothing
    when the class arrived. Every state of the page writes the region at the same place, right under
    the uploader, before anything else, so the browser keeps one region whose text changes (a region
    added with its text already in it is not announced by every screen reader). A screen reader
    speaks a change of that text, not a rewrite with the same text, so an answer's text starts with
    its upload's number and name (:func:`upload_number`): two X-rays in a row that are both "Not
    fractured" are both heard. A refusal is an ``st.error``, which Streamlit marks ``role="alert"``,
    and is announced as such.
    """
    st.markdown(f'<div role="status" aria-live="polite" aria-atomic="true" style="{_VISUALLY_HIDDEN}">'
                # On one line: a blank line in an upload's name would end the HTML block, and Markdown
                # would read the rest.
                f"{html.escape(' '.join(text.split()))}</div>", unsafe_allow_html=True)


def upload_number(file_id: str) -> int:
    """The upload's place among this browser session's uploads, counting from 1.

    Streamlit gives every upload a new ``file_id``, the same file uploaded again included, and keeps
    it over the reruns that change nothing, so the number changes with each upload and only then:
    the live region's text (:func:`announce`) changes, and is heard, once per answer.
    """
    state = st.session_state
    if state.get("upload_id") != file_id:
        state["upload_id"] = file_id
        state["uploads"] = state.get("uploads", 0) + 1
    return state["uploads"]


def show_model(model: ServedModel, settings: PageSettings, detector: ServedDetector | None, figures: str | None) -> None:
    config = model.config
    data_config = config.data_config
    averaged = averaging_note(config.extra, members_of(model))
    st.markdown(
        f"Model **{model.name}**, version **{model.version}**, alias **@{model.alias}**",
        help=f"Loaded from the MLflow registry at {settings.shown_uri}",
    )
    with st.sidebar:
        st.header("Model")
        st.markdown(
            "\n".join(
                [
                    f"- registered model: `{model.name}`",
                    f"- version: `{model.version}` (alias `@{model.alias}`)",
                    f"- architecture: `{config.architecture}`",
                    *averaged,
                    f"- input: {data_config.input_size[1]} x {data_config.input_size[2]} px, `{data_config.aspect}`",
                    f"- decision threshold: {against_threshold(config.threshold, config.threshold)[1]}"
                    + (f". {plain(figures)}" if figures else ""),
                    f"- training run: `{model.run_id}`",
                    f"- registry: `{settings.shown_uri}`",
                ]
            )
        )
        st.header("Fracture detector")
        if detector is None:
            st.markdown(f"No detector at `{settings.detector_name}@{model.alias}`: no boxes are drawn."
                        if settings.detector_name else
                        "The detector is switched off (`FRACTURE_DETECTOR_NAME` is empty): no boxes are drawn.")
        else:
            st.markdown(f"- registered model: `{detector.name}`\n- version: `{detector.version}`\n"
                        f"- architecture: `{detector.architecture}`")


def show_result(
    model: ServedModel, detector: ServedDetector | None, name: str, data: bytes, limit_mb: int, figures: str | None,
    number: int,
) -> None:
    """The answer for one upload, ``number`` (:func:`upload_number`) in this browser session."""
    try:
        xray = check_upload(name, data, model.config.input, max_bytes=limit_mb * 2**20)
    except UploadRejected as exc:
        announce("")
        st.error(plain(str(exc)))
        return
    try:
        prediction = model.predict(data)
    except Exception as exc:  # the page must keep working for the next upload, whatever failed
        log.exception("analysing %s failed", name)
        announce("")
        st.error(plain(f"{name} could not be analysed ({type(exc).__name__}: {exc}). Try another file."))
        return
    label = LABELS[prediction.label]
    probability, threshold = against_threshold(prediction.fracture_probability, prediction.threshold)
    announce(f"Upload {number}, {readable(name)}. Predicted class: {label}. Fracture probability {probability}, "
             f"threshold {threshold}.")
    display = xray.image.copy()
    display.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))

    for note in xray.warnings:  # each names the file: a note may start mid-sentence ("its pixels are not square")
        st.warning(plain(f"{name}: {note}"))
    cols = st.columns(3)
    cols[0].metric("Predicted class", label)
    cols[1].metric("Fracture probability", probability)
    cols[2].metric("Threshold", threshold)
    # Body text, not a caption: the rule and the test figures are read before the images.
    st.markdown(
        "The class is Fractured when the fracture probability is at least the threshold. "
        + (plain(figures) + " " if figures else "")
        + f"This is decision support for a trained reader, not a diagnosis: {NOT_FOR_CLINICAL_USE}."
    )
    columns = st.columns(2 if detector is None else 3)
    width, height = xray.image.size
    kind = {"L": "greyscale", "RGB": "colour"}.get(xray.mode, xray.mode)
    columns[0].image(display, caption=plain(f"{name} ({width} x {height} px, {xray.format} {xray.mode})"), width="stretch",
                     alt=readable(f"X-ray {name}, {width} by {height} pixels, {kind} {xray.format}"))
    show_heat_map(columns[1], model, name, data, prediction.class_index, label, display)
    if detector is not None:
        # Boxes come in the file's own pixels: a DICOM's stored grid, not the square-pixel image shown.
        show_boxes(columns[2], detector, name, data, display, xray.stored_size or (width, height))


def show_heat_map(
    column: DeltaGenerator, model: ServedModel, name: str, data: bytes, target: int, label: str, display: Image.Image
) -> None:
    """The Grad-CAM overlay for the predicted class; if it fails, the prediction above stays on the page."""
    try:
        heat_overlay, heat = model.heat_map(data, target, display)
    except Exception as exc:  # an explanation failing must not take the scored answer with it
        log.exception("the heat map failed on %s", name)
        column.warning(plain(f"No heat map for {name} ({type(exc).__name__}: {exc}); the prediction above stands."))
        return
    if heat.max() > 0:
        # With its colour bar under it: the colours alone did not say which end meant more.
        heat_overlay = with_legend(heat_overlay)
        caption = (f"Grad-CAM heat map for '{label}': the brighter and yellower the colour, the more the region "
                   "raised that score (dark purple least)")
        alt = (f"Grad-CAM heat map for {label} over the X-ray, strongest {where(heat)}. Under it a colour bar, "
               f"{LEGEND_TITLE.lower()}, from {LEGEND_ENDS[0]} (grey) to {LEGEND_ENDS[1]} (pale yellow)")
    else:
        caption = f"Grad-CAM heat map for '{label}': no region raised that score above the rest"
        alt = f"Grad-CAM heat map for {label}: no region raised that score above the rest"
    members = members_of(model)
    averaged = [f"the mean of its {members} networks' maps"] if members > 1 else []
    if model.config.tta == "hflip":
        averaged.append("each over the X-ray and its mirror, as the score" if members > 1 else
                        "the mean over the X-ray and its mirror, as the score")
    if averaged:
        caption += f" ({'; '.join(averaged)})"
    column.image(heat_overlay, caption=caption, width="stretch", alt=alt)


def where(heat: np.ndarray) -> str:
    """Where a heat map peaks, in words: ``in the upper third, on the left``."""
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    height, width = heat.shape
    band = ("upper", "middle", "lower")[min(2, 3 * row // height)]
    side = ("on the left", "in the centre", "on the right")[min(2, 3 * col // width)]
    return f"in the {band} third, {side}"


def show_boxes(
    column: DeltaGenerator, detector: ServedDetector, name: str, data: bytes, display: Image.Image,
    size: tuple[int, int],
) -> None:
    """The detector's boxes with their scores on the X-ray, beside the heat map."""
    try:
        found = detector.find(data)
    except Exception as exc:  # the classifier's answer stays on the page whatever the detector does
        log.exception("the detector failed on %s", name)
        column.warning(plain(f"The fracture detector could not analyse {name} ({type(exc).__name__}: {exc})."))
        return
    n = len(found.boxes)
    if n:
        # The detector keeps its MAX_DETECTIONS highest boxes: at the cap, more may have scored as high.
        counted = f"at least {n} boxes" if n >= MAX_DETECTIONS else f"{n} box{'es' if n > 1 else ''}"
        highest, threshold = against_threshold(found.fracture_score, found.threshold)
        caption = f"Fracture detector v{detector.version}: {counted} scored at least {threshold} (highest {highest})"
        if n > MAX_BOXES_DRAWN:
            caption += f"; the {MAX_BOXES_DRAWN} highest are drawn"
    else:
        highest, threshold = against_threshold(found.fracture_score, found.threshold)
        caption = f"Fracture detector v{detector.version}: no box scored at least {threshold} (highest {highest})"
    # Each axis by its own scale: the shown image's sides are rounded apart.
    drawn = draw_boxes(display, found.boxes[:MAX_BOXES_DRAWN], (display.width / size[0], display.height / size[1]))
    column.image(drawn, caption=caption, width="stretch", alt=f"X-ray with the detector's boxes. {caption}")


def main() -> None:
    st.set_page_config(page_title="Bone fracture classification", layout="wide")
    st.html(PAGE_STYLE)  # style alone: Streamlit puts it outside the page's layout
    st.title("Bone fracture classification")
    # On every state of the page, before anything is uploaded or refused, as the model card and
    # the DICOM reports say it.
    st.markdown(f":red[**{NOT_FOR_CLINICAL_USE}.**] Research and decision support for a trained reader, who "
                "reads every image: not a diagnosis.")
    try:
        settings = settings_from_env()
        (version, run_id), unreachable = classifier_alias(settings).current()
        model = served_model(settings, version, run_id)
    except (ModelUnavailable, ConfigError) as exc:
        st.error(plain(str(exc)))
        return
    if unreachable is not None:
        still_serving("the model's", version, unreachable)
    detector = the_detector(settings)
    figures = measured_at_threshold(settings, model)
    show_model(model, settings, detector, figures)

    limit_mb = int(st.get_option("server.maxUploadSize"))
    policy = model.config.input
    uploaded = st.file_uploader(
        "Choose an X-ray (JPG, JPEG, PNG or DICOM)",
        # Any name: a PACS names DICOM files without an ending (IM0001) or after their UID
        # (1.2.840....320), which a list of endings would refuse. The model's checks read the
        # bytes and refuse what is not an X-ray, saying what to send.
        type=None,
        help=(
            f"Up to {limit_mb} MiB; 8-bit greyscale or RGB, or a single-frame DICOM radiograph "
            f"({', '.join(policy.modalities)}); sides between {policy.min_side} and {policy.max_side} px."
        ),
    )
    if uploaded is None:
        announce("")
        st.info("Upload an X-ray to see the predicted class, the fracture probability and a heat map.")
        return
    show_result(model, detector, uploaded.name, uploaded.getvalue(), limit_mb, figures, upload_number(uploaded.file_id))


main()
