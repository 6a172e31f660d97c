"""A request is checked once: ``VideoGenerator.check`` validates its fields once (``SamplingParams.
validate``, which opens no file) and decodes each image once; ``submit`` and the image stages take
what it made, through the Python API and through the server alike."""

from __future__ import annotations

import collections
import dataclasses
import io
import time

import numpy as np
import pytest
from PIL import Image

from vidloom import InvalidRequestError, SamplingParams, VideoGenerator
from vidloom.pipelines.base import StageVerificationError
from vidloom.pipelines.batch import ForwardBatch
from vidloom.request import CheckedRequest

from .parity.test_generate_parity import SIZE
from .parity.test_i2v_parity import build_i2v_folder, picture

STEPS = dict(num_inference_steps=2, guidance_scale=4.0, seed=3)


@pytest.fixture(scope="module")
def flf_gen(tiny_wan_pipe, tmp_path_factory):
    """A tiny first-last-frame model: it takes an image and a last image."""
    folder = build_i2v_folder(tiny_wan_pipe, tmp_path_factory.mktemp("flf2v"), flf=True)
    return VideoGenerator.from_pretrained(folder, dtype="fp32")


@pytest.fixture
def images(tmp_path):
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    picture(1).save(first)
    picture(2).save(last)
    return first, last


class Counts:
    """How often ``SamplingParams.validate`` ran, ``io.images.load_image`` ran per field, and PIL
    opened an image file."""

    def __init__(self, monkeypatch):
        import vidloom.io.images as images_module

        self.validate, self.decode, self.opened = 0, collections.Counter(), collections.Counter()
        validate, load_image, open_image = SamplingParams.validate, images_module.load_image, Image.open

        def counting_validate(params, *args, **kwargs):
            self.validate += 1
            return validate(params, *args, **kwargs)

        def counting_load_image(value, field="image"):
            self.decode[field] += 1
            return load_image(value, field)

        def counting_open(path, *args, **kwargs):
            self.opened[str(path)] += 1
            return open_image(path, *args, **kwargs)

        monkeypatch.setattr(SamplingParams, "validate", counting_validate)
        monkeypatch.setattr(images_module, "load_image", counting_load_image)
        monkeypatch.setattr(Image, "open", counting_open)


def test_generate_validates_once_and_decodes_each_image_once(flf_gen, images, monkeypatch):
    first, last = images
    counts = Counts(monkeypatch)
    out = flf_gen.generate("a cat", image=str(first), last_image=str(last), **STEPS, **SIZE)
    assert out.frames.shape == (9, 32, 48, 3)
    assert counts.validate == 1
    assert counts.decode == {"image": 1, "last_image": 1}
    assert counts.opened == {str(first): 1, str(last): 1}
    # the decoded images are the ones the model saw: the same video as from the PIL images themselves
    monkeypatch.undo()
    assert np.array_equal(out.frames, flf_gen.generate("a cat", image=picture(1), last_image=picture(2),
                                                       **STEPS, **SIZE).frames)


def test_several_videos_check_each_once_and_decode_the_shared_images_once(flf_gen, images, monkeypatch):
    first, last = images
    counts = Counts(monkeypatch)
    tasks = flf_gen.submit_many(["a cat", "a dog"], num_videos_per_prompt=2, image=str(first),
                                last_image=str(last), **STEPS, **SIZE)
    assert len(tasks) == 4 and counts.validate == 4
    assert counts.decode == {"image": 1, "last_image": 1}
    assert counts.opened == {str(first): 1, str(last): 1}
    assert all(task.batch.images == tasks[0].batch.images for task in tasks)


def test_a_checked_request_is_submitted_as_it_is(flf_gen, tiny_generator, images, monkeypatch):
    first, last = images
    checked = flf_gen.check("a cat", image=str(first), last_image=str(last), **STEPS, **SIZE)
    assert isinstance(checked, CheckedRequest) and checked.params.image == str(first)
    assert [image.size for image in checked.images] == [(70, 50), (70, 50)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.image = None
    counts = Counts(monkeypatch)
    task = flf_gen.submit(checked)
    assert (counts.validate, sum(counts.decode.values()), sum(counts.opened.values())) == (0, 0, 0)
    assert task.params is checked.params and task.batch.images == checked.images
    with pytest.raises(TypeError, match="takes no options"):
        flf_gen.submit(checked, seed=4)
    with pytest.raises(ValueError, match="another model"):
        tiny_generator.submit(checked)


def test_validate_opens_no_file_and_check_decodes(flf_gen, images, monkeypatch):
    """A path to no file passes ``validate`` (field checks only: it opens nothing) and fails
    ``check``, which decodes, naming the field."""
    import vidloom.io.images as images_module

    first, last = images

    def no_file_access(*args, **kwargs):
        raise AssertionError("validate opened a file")

    with monkeypatch.context() as patched:
        patched.setattr(Image, "open", no_file_access)
        patched.setattr(images_module, "_read_file", no_file_access)
        patched.setattr(images_module, "load_image", no_file_access)
        SamplingParams(image="/no/such.png", last_image=str(last), **SIZE).validate(flf_gen.pipeline.limits)
        flf_gen.pipeline.validate_request(SamplingParams(image=str(first), last_image="/no/such/last.png", **SIZE))
    for field, request in (("image", dict(image="/no/such.png", last_image=str(last))),
                           ("last_image", dict(image=str(first), last_image="/no/such/last.png"))):
        with pytest.raises(InvalidRequestError, match="no image file") as err:
            flf_gen.check("a cat", **request, **SIZE)
        assert err.value.field == field
    # a value of a kind no image is read from is a field fault: validate names it
    with pytest.raises(InvalidRequestError, match="unsupported type int") as err:
        SamplingParams(image=5, last_image=str(last), **SIZE).validate(flf_gen.pipeline.limits)
    assert err.value.field == "image"


def test_validation_is_no_unit_of_work_and_the_image_stage_needs_decoded_images(flf_gen, images):
    first, last = images
    task = flf_gen.submit("a cat", image=str(first), last_image=str(last), **STEPS, **SIZE)
    stages, cursor = [], (0, 0)
    while (unit := flf_gen.pipeline.unit_at(task.batch, cursor)) is not None:
        stages.append(unit.stage.name)
        cursor = unit.next_cursor
    assert stages[0] == "text_encoding" and "input_validation" not in stages
    # text and image encoding, timesteps, latents, the steps, decoding
    assert task.total_units == len(stages) == 4 + STEPS["num_inference_steps"] + 1
    stage = next(s for s in flf_gen.pipeline.stages if s.name == "image_encoding")
    with pytest.raises(StageVerificationError, match="images must hold the request's 2 decoded image"):
        stage.verify_input(ForwardBatch(params=task.params)).raise_if_failed()


# --- the server -----------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    data = io.BytesIO()
    picture(seed).save(data, format="PNG")
    return data.getvalue()


def _create_and_wait(http, files: dict) -> dict:
    form = {"prompt": "a cat", "size": "48x32", "num_frames": "9", "num_inference_steps": "2", "seed": "3"}
    r = http.post("/v1/videos", data=form, files=files)
    assert r.status_code == 200, r.text[:300]
    deadline = time.time() + 120
    while (video := http.get(f"/v1/videos/{r.json()['id']}").json())["status"] not in ("completed", "failed"):
        assert time.time() < deadline, video
        time.sleep(0.05)
    return video


@pytest.mark.parametrize("let_go", [False, True], ids=["checked-on-arrival", "let-go-and-checked-when-claimed"])
def test_the_server_validates_once_and_decodes_each_image_once(flf_gen, tmp_path, monkeypatch, let_go):
    """Checked in the handler (a bad image is a 400 there), then submitted as it is when the engine
    loop claims the job. A request the loop no longer keeps (``let_go``: none are kept) is checked
    again from its record when claimed: twice in all, never more."""
    from fastapi.testclient import TestClient

    from vidloom.serve.app import ServeSettings, create_app

    app = create_app(flf_gen, ServeSettings(model_name="flf", data_dir=tmp_path / "data", poll_after_ms=50))
    if let_go:
        app.state.loop.waiting.max_requests = 0
    with TestClient(app, base_url="http://127.0.0.1") as http:
        r = http.post("/v1/videos", data={"prompt": "a cat", "size": "48x32", "num_frames": "9"},
                      files={"input_reference": ("a.png", b"not an image"), "last_image": ("b.png", _png(2))})
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"
        counts = Counts(monkeypatch)
        video = _create_and_wait(http, {"input_reference": ("a.png", _png(1)), "last_image": ("b.png", _png(2))})
    assert video["status"] == "completed", video
    times = 2 if let_go else 1
    assert counts.validate == times
    assert counts.decode == {"image": times, "last_image": times}
    assert sorted(counts.opened.values()) == [times, times]
    assert len(app.state.loop.waiting) == 0


def test_waiting_requests_are_bounded_oldest_first():
    from types import SimpleNamespace

    from vidloom.serve.scheduler import WaitingRequests

    def request(pixels: int):
        return SimpleNamespace(images=(SimpleNamespace(width=pixels, height=1),) if pixels else ())

    waiting = WaitingRequests(max_requests=3, max_pixels=100)
    for job, pixels in (("a", 60), ("b", 0), ("c", 30)):
        waiting.put(job, request(pixels))
    waiting.put("d", request(20))  # 110 pixels and 4 requests: "a" goes
    assert waiting.take("a") is None and len(waiting) == 3
    waiting.put("e", request(70))  # 120 pixels: "b" goes, then "c"
    assert [waiting.take(job) is not None for job in "bcde"] == [False, False, True, True]
    assert len(waiting) == 0 and waiting._pixels == 0
