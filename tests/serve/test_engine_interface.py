"""``vidloom serve`` talks to the generator only through ``serve.engine.Engine``: a server given an
object that has exactly that interface (and nothing of the generator's pipeline, stages or
components) serves a request to the end, a bad one is a 400, and both go through the interface."""

from __future__ import annotations

import pytest

from vidloom.serve.app import ServeSettings, create_app
from vidloom.serve.engine import Engine

from .test_api import SMALL, Server, decode_mp4

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


class OnlyTheInterface:
    """The generator behind the ``Engine`` methods, each call counted; any other attribute is an
    AttributeError (slots: no ``pipeline``, no ``config``)."""

    __slots__ = ("_generator", "calls")

    def __init__(self, generator):
        self._generator, self.calls = generator, []

    def _call(self, name, *args, **kwargs):
        self.calls.append(name)
        return getattr(self._generator, name)(*args, **kwargs)

    def check(self, prompt="", **sampling):
        return self._call("check", prompt, **sampling)

    def submit(self, request="", callback=None, **sampling):
        return self._call("submit", request, callback, **sampling)

    def step_many(self, tasks):
        return self._call("step_many", tasks)

    def step_quietly(self, task):
        return self._call("step_quietly", task)


def test_the_server_needs_nothing_but_the_engine_interface(tiny_generator, tmp_path):
    from openai import BadRequestError, OpenAI

    engine = OnlyTheInterface(tiny_generator)
    assert not hasattr(engine, "pipeline")
    assert {name for name in dir(Engine) if not name.startswith("_")} == {"check", "submit", "step_many",
                                                                          "step_quietly"}
    server = Server(create_app(engine, ServeSettings(model_name="tiny-wan", data_dir=tmp_path, poll_after_ms=50)))
    try:
        client = OpenAI(api_key="unused-on-loopback", base_url=f"{server.url}/v1", max_retries=0)
        video = client.videos.create_and_poll(prompt="a cat", size="48x32", extra_body=SMALL, poll_interval_ms=50)
        assert video.status == "completed"
        assert len(decode_mp4(client.videos.download_content(video.id).read())) == 9
        with pytest.raises(BadRequestError, match="num_inference_steps"):
            client.videos.create(prompt="a cat", size="48x32", extra_body=dict(SMALL, num_inference_steps=0))
    finally:
        server.stop()
    assert engine.calls[0] == "check" and "submit" in engine.calls and "step_many" in engine.calls
