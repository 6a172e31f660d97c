"""LoRA adapters in the server: loaded from a folder at start (``vidloom serve --lora-dir``),
listed in ``/v1/models``, chosen per request by name (``"lora": [{"name", "scale"}]``, JSON or a
form's JSON string); a name the server does not have is a 400 naming the field."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vidloom import VideoGenerator
from vidloom.cli import lora_files
from vidloom.serve.app import ServeSettings, create_app

from .test_api import SMALL, Server

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def write_adapter(path, seed: int):
    """A kohya file touching every block's self-attention q and v (tiny model: dim 24)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in (0, 1):
        for layer in ("self_attn_q", "self_attn_v"):
            key = f"lora_unet_blocks_{block}_{layer}"
            tensors[f"{key}.lora_down.weight"] = 0.4 * torch.randn(2, 24, generator=g)
            tensors[f"{key}.lora_up.weight"] = 0.4 * torch.randn(24, 2, generator=g)
    save_file(tensors, str(path))


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("max_loras", [None, 2])
def test_requests_choose_among_the_servers_adapters(tiny_wan_dir, tmp_path, max_loras):
    """Every adapter in memory, or (``--max-loras 2``) registered and loaded at need: the job whose
    adapter finds no room waits, claimed, until a running one finishes."""
    from openai import OpenAI

    folder = tmp_path / "loras"
    folder.mkdir()
    for k, name in enumerate(("anime", "sketch", "neon")):
        write_adapter(folder / f"{name}.safetensors", k)
    (folder / "notes.txt").write_text("not an adapter")
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_loras=max_loras)
    for path in lora_files(folder):  # as `vidloom serve --lora-dir` does
        if max_loras is None:
            gen.load_lora(path, name=path.stem)
        else:
            gen.register_lora(path, name=path.stem)
    server = Server(create_app(gen, ServeSettings(model_name="tiny-wan", data_dir=tmp_path / "data",
                                                  poll_after_ms=50)))
    try:
        with urllib.request.urlopen(f"{server.url}/v1/models") as reply:
            models = json.loads(reply.read())["data"]
        assert [m["id"] for m in models] == ["tiny-wan", "anime", "neon", "sketch"]
        assert {m.get("kind") for m in models[1:]} == {"lora"} and models[1]["parent"] == "tiny-wan"
        client = OpenAI(api_key="unused-on-loopback", base_url=f"{server.url}/v1", max_retries=0)
        choices = [[{"name": "anime", "scale": 0.8}], [{"name": "sketch"}], [{"name": "neon", "scale": 1.5},
                   {"name": "anime", "scale": 0.3}], None]
        videos = [client.videos.create(prompt="a cat", size="48x32", extra_body=dict(SMALL, **({"lora": c} if c else {})))
                  for c in choices]  # queued together: the engine steps them in shared forwards
        done = [client.videos.poll(v.id, poll_interval_ms=50) for v in videos]
        assert [v.status for v in done] == ["completed"] * 4
        status, body = post(f"{server.url}/v1/videos", dict(prompt="a cat", size="48x32", lora=[{"name": "oil"}],
                                                            **SMALL))
        assert status == 400 and "lora: no adapter named 'oil' is loaded (allowed: anime, neon, sketch)" in \
            body["error"]["message"]
        status, body = post(f"{server.url}/v1/videos", dict(prompt="a cat", size="48x32", lora="anime", **SMALL))
        assert status == 400 and body["error"]["message"].startswith("lora: is not JSON")  # a string is a form's JSON
        form = urllib.request.Request(f"{server.url}/v1/videos", data=(
            b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n"
            b"--x\r\nContent-Disposition: form-data; name=\"size\"\r\n\r\n48x32\r\n"
            b"--x\r\nContent-Disposition: form-data; name=\"num_frames\"\r\n\r\n9\r\n"
            b"--x\r\nContent-Disposition: form-data; name=\"num_inference_steps\"\r\n\r\n1\r\n"
            b"--x\r\nContent-Disposition: form-data; name=\"lora\"\r\n\r\n[{\"name\": \"neon\", \"scale\": 0.5}]\r\n"
            b"--x--\r\n"), headers={"content-type": "multipart/form-data; boundary=x"})
        with urllib.request.urlopen(form) as reply:
            job = json.loads(reply.read())
        assert client.videos.poll(job["id"], poll_interval_ms=50).status == "completed"
    finally:
        server.stop()


def test_the_adapters_change_the_video_as_the_python_api_does(tiny_wan_dir, tmp_path):
    write_adapter(tmp_path / "a.safetensors", 0)
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    gen.load_lora(tmp_path / "a.safetensors", name="a")
    run = dict(height=32, width=48, num_frames=9, num_inference_steps=2, seed=1)
    plain, adapted = gen.generate("a cat", **run).frames, gen.generate("a cat", lora=[{"name": "a"}], **run).frames
    assert np.abs(plain - adapted).max() > 1e-3
