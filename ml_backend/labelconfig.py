"""Reading a Label Studio labelling config: one Image object and one single-choice Choices control."""
from __future__ import annotations

import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence


class LabelConfigError(ValueError):
    """The labelling config is not one this backend can serve (the message says why)."""


@dataclass(frozen=True)
class LabelConfigInfo:
    """What the backend needs from a labelling config.

    ``image_field`` is the task data key holding the image URL (``$image`` -> ``image``);
    ``from_name`` / ``to_name`` are the names a prediction's result must use.
    """

    from_name: str
    to_name: str
    image_field: str
    class_names: tuple[str, ...]

    def index_of(self, choice: object) -> int | None:
        """Class index of a label value, or None when it is not one of the config's choices.  Spaces
        around it and its Unicode form do not count: "Bénin" typed as e + combining accent (as some
        exports write it) is the config's "Bénin"."""
        if choice is None:
            return None
        return self._index_by_name.get(label_key(choice))

    @cached_property
    def _index_by_name(self) -> dict[str, int]:
        return label_index(self.class_names)


def label_key(label: object) -> str:
    """What two spellings of one label have in common: no surrounding spaces, Unicode form NFC."""
    return unicodedata.normalize("NFC", str(label).strip())


def label_index(class_names: Sequence[str]) -> dict[str, int]:
    """:func:`label_key` of each class name -> its position (the first, for a name given twice)."""
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        index.setdefault(label_key(name), i)
    return index


_OBJECT_TAGS = {"image", "text", "hypertext", "audio", "audioplus", "video", "timeseries",
                "paragraphs", "table", "pdf", "multichannel", "markdown"}
_CONTROL_TAGS = {"choices", "labels", "rectanglelabels", "polygonlabels", "keypointlabels",
                 "brushlabels", "ellipselabels", "textarea", "rating", "number", "datetime",
                 "taxonomy", "pairwise", "ranker", "relations", "timeserieslabels",
                 "hypertextlabels", "paragraphlabels", "videorectangle", "magicwand"}


def parse_label_config(label_config: str | None) -> LabelConfigInfo:
    """Parse ``label_config`` (Label Studio XML).

    Raises
    ------
    LabelConfigError
        The XML is missing or malformed, there is not exactly one Image object and exactly
        one Choices control on it, the Choices allows several choices, or it has no choice.
    """
    if not label_config or not str(label_config).strip():
        raise LabelConfigError("empty labelling config: expected <View> with one <Image> "
                               "and one single-choice <Choices>")
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as exc:
        raise LabelConfigError(f"labelling config is not valid XML: {exc}") from None

    objects = [el for el in root.iter() if el.tag.lower() in _OBJECT_TAGS]
    controls = [el for el in root.iter() if el.tag.lower() in _CONTROL_TAGS]
    images = [el for el in objects if el.tag.lower() == "image"]
    if len(images) != 1 or len(objects) != 1:
        raise LabelConfigError(
            "this backend needs exactly one <Image> object and no other object tag; "
            f"found {[el.tag for el in objects] or 'none'}")
    choices = [el for el in controls if el.tag.lower() == "choices"]
    if len(choices) != 1 or len(controls) != 1:
        raise LabelConfigError(
            "this backend needs exactly one <Choices> control and no other control tag; "
            f"found {[el.tag for el in controls] or 'none'}")
    image, control = images[0], choices[0]
    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f"<Image value={value!r}> must reference a task field like '$image'")
    to_name = control.get("toName", "")
    if to_name != image.get("name"):
        raise LabelConfigError(
            f"<Choices toName={to_name!r}> must point at the Image name {image.get('name')!r}")
    if (control.get("choice") or "single").lower() not in ("single", "single-radio"):
        raise LabelConfigError(
            f"<Choices choice={control.get('choice')!r}>: only single-choice classification "
            "is supported (choice=\"single\" or \"single-radio\")")
    names = [c.get("alias") or c.get("value") for c in control.iter() if c.tag.lower() == "choice"]
    names = [n for n in names if n]
    if len(names) < 2:
        raise LabelConfigError("<Choices> needs at least two <Choice value=...> classes")
    if len(set(names)) != len(names):
        raise LabelConfigError(f"<Choices> has duplicate class names: {names}")
    if not control.get("name"):
        raise LabelConfigError("<Choices> needs a name attribute")
    return LabelConfigInfo(from_name=control.get("name"), to_name=to_name,
                           image_field=value[1:], class_names=tuple(names))
