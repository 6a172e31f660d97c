"""``CheckedRequest``: a request checked once against a model, its images decoded once.

``VideoGenerator.check`` makes it: the fields are validated (``SamplingParams.validate``, which
opens no file, and the pipeline's own checks), then each given image is decoded with its bounded
checks (``io.images.load_image``: file size, format, dimensions). ``submit`` queues it as it is,
and the image stages take the decoded images from the batch: no field is checked again and no
file is read again between the check and the video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import RequestLimits, SamplingParams

IMAGE_FIELDS = ("image", "last_image")


@dataclass(frozen=True)
class CheckedRequest:
    """A request as ``VideoGenerator.check`` made it: ``params`` validated against ``limits`` (the
    model's), ``image`` and ``last_image`` decoded (RGB PIL images; None where not given)."""

    params: SamplingParams
    limits: RequestLimits
    image: Any = None
    last_image: Any = None

    @property
    def images(self) -> tuple[Any, ...]:
        """The decoded images in the order the image stages take them: the first frame, then the
        last frame if given."""
        return tuple(image for image in (self.image, self.last_image) if image is not None)


def decode_images(values: dict[str, Any]) -> dict[str, Any]:
    """Each image field given in ``values`` (``image``, ``last_image``: a path, a PIL image or an
    array) decoded as an RGB PIL image with its bounded checks; InvalidRequestError names the
    field. Fields not given are left out."""
    from .io.images import load_image

    return {name: load_image(values[name], name) for name in IMAGE_FIELDS if values.get(name) is not None}


def checked_requests(requests: list[SamplingParams], limits: RequestLimits) -> list[CheckedRequest]:
    """``requests`` (each already validated against ``limits``) with their images decoded: an
    image object given to several requests (the videos of one call) is decoded once for all."""
    decoded: dict[int, dict[str, Any]] = {}  # id of the value given -> its decoded image by field
    checked = []
    for params in requests:
        images = {}
        for name in IMAGE_FIELDS:
            value = getattr(params, name)
            if value is None:
                continue
            by_field = decoded.setdefault(id(value), {})  # the value lives on in params: its id stays its own
            if name not in by_field:
                by_field.update(decode_images({name: value}))
            images[name] = by_field[name]
        checked.append(CheckedRequest(params, limits, **images))
    return checked
