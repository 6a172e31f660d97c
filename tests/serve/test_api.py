"""``vidloom serve`` through the official ``openai`` client (a real HTTP server on loopback) and
through plain HTTP for malformed and hostile requests."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest

from vidloom.serve.app import MAX_UPLOAD_BYTES, ServeSettings, create_app

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

SMALL = {"num_frames": 9, "num_inference_steps": 2, "guidance_scale": 4.0}  # with size 48x32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tiny_generator, tmp_path_factory):
    settings = ServeSettings(model_name="tiny-wan", data_dir=tmp_path_factory.mktemp("serve"), poll_after_ms=50)
    s = Server(create_app(tiny_generator, settings))
    s.tmp = tmp_path_factory.mktemp("serve-scratch")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(api_key="unused-on-loopback", base_url=f"{server.url}/v1", max_retries=0)


def raw_status(port: int, request: bytes) -> int:
    """Send raw bytes (headers a well-behaved client would not send) and read the status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        return int(conn.recv(4096).split(b" ", 2)[1])


def decode_mp4(data: bytes) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def test_create_and_poll_then_download(client):
    video = client.videos.create_and_poll(prompt="a red circle moving left", size="48x32", extra_body=SMALL,
                                          poll_interval_ms=50)
    assert video.status == "completed" and video.progress == 100 and video.object == "video"
    assert video.model == "tiny-wan" and video.size == "48x32" and video.error is None
    assert video.completed_at >= video.created_at
    again = client.videos.retrieve(video.id)
    assert again.id == video.id and again.status == "completed"
    frames = decode_mp4(client.videos.download_content(video.id).read())
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)


def test_seconds_become_a_4k_plus_1_frame_count(client):
    video = client.videos.create_and_poll(prompt="a cat", size="48x32", seconds="1",
                                          extra_body={"fps": 8, "num_inference_steps": 1}, poll_interval_ms=50)
    assert video.status == "completed" and video.seconds == "1"
    assert len(decode_mp4(client.videos.download_content(video.id).read())) == 9  # 8 frames -> 9 (4k + 1)


def test_list_pages_with_the_cursor(client):
    ids = [client.videos.create(prompt=f"a cat {i}", size="48x32", extra_body=dict(SMALL, num_inference_steps=1)).id
           for i in range(3)]
    page = client.videos.list(limit=2, order="asc")
    assert len(page.data) == 2 and page.has_more
    everything = [v.id for v in client.videos.list(limit=2, order="asc")]  # auto-pagination follows last_id
    assert everything[-3:] == ids and len(everything) == len(set(everything))
    newest = client.videos.list(limit=1)
    assert newest.data[0].id == ids[-1]
    for video_id in ids:
        client.videos.poll(video_id, poll_interval_ms=50)


def test_delete_and_unknown_ids(client):
    import openai

    video = client.videos.create_and_poll(prompt="a cat", size="48x32", extra_body=SMALL, poll_interval_ms=50)
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content("video_does_not_exist")


def test_bad_requests_are_400_naming_the_field(client, server):
    import openai

    for kwargs, param in [
        (dict(size="48x33"), "height"),
        (dict(size="100000x32"), "width"),
        (dict(size="big"), "size"),
        (dict(size="48x32", extra_body={"num_frames": "many"}), "num_frames"),
        (dict(size="48x32", extra_body={"guidance_scale": "nan"}), "guidance_scale"),
        (dict(size="48x32", extra_body={"colour": "red"}), "colour"),
        (dict(size="48x32", model="sora-2"), "model"),
        (dict(size="48x32", seconds="-4"), "seconds"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.videos.create(prompt="a cat", **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    # an image for this text-to-video model
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt="a cat", size="48x32", input_reference=("a.png", png.getvalue(), "image/png"))
    assert err.value.body["param"] == "image"
    # still serving
    assert client.videos.create_and_poll(prompt="a cat", size="48x32", extra_body=SMALL,
                                         poll_interval_ms=50).status == "completed"


def test_plain_http_hostile_requests(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = http.post("/v1/videos", json=["a list"])
        assert r.status_code == 400
        r = http.post("/v1/videos", json={"prompt": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = http.post("/v1/videos", content=b"prompt=a", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = http.post("/v1/videos", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 400
        assert raw_status(server.port, b"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 1000000000000\r\n\r\n{") == 413  # refused before reading
        big = b"\x89PNG" + b"\0" * (MAX_UPLOAD_BYTES + 10)
        r = http.post("/v1/videos", data={"prompt": "a cat"}, files={"input_reference": ("a.png", big, "image/png")})
        assert r.status_code in (400, 413)
        r = http.post("/v1/videos", data={"prompt": "a cat"}, files={"input_reference": ("a.png", b"not an image")})
        assert r.status_code == 400
        r = http.post("/v1/videos", data={"prompt": "a cat"}, files={"other": ("x", b"1")})
        assert r.status_code == 400
        r = http.get("/v1/videos", params={"limit": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
        r = http.get("/v1/videos", params={"after": "video_nope"})
        assert r.status_code == 404
        r = http.get("/v1/videos/" + "x" * 5000)
        assert r.status_code == 404
        # JSON bodies are accepted too
        r = http.post("/v1/videos", json={"prompt": "a dog", "size": "48x32", **SMALL})
        assert r.status_code == 200 and r.json()["status"] == "queued"
        assert r.headers["openai-poll-after-ms"] == "50"
        assert http.get("/health").json()["status"] == "ok"
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-wan"
        metrics = http.get("/metrics").text
        assert "vidloom_jobs" in metrics and "vidloom_queue_depth" in metrics and "vidloom_unit_seconds" in metrics


def test_api_key_is_required_when_set(tiny_generator, tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(tiny_generator, ServeSettings(model_name="m", data_dir=tmp_path, api_key="s3cret"),
                     start_loop=False)
    with TestClient(app, base_url="http://127.0.0.1") as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200  # liveness probes need no key


def test_queue_full_is_429_and_cancel_fails_a_queued_job(tiny_generator, tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(tiny_generator, ServeSettings(model_name="m", data_dir=tmp_path, max_queue=2), start_loop=False)
    body = {"prompt": "a cat", "size": "48x32", **SMALL}
    with TestClient(app, base_url="http://127.0.0.1") as http:
        first = http.post("/v1/videos", json=body).json()
        assert http.post("/v1/videos", json=body).status_code == 200
        full = http.post("/v1/videos", json=body)
        assert full.status_code == 429 and full.headers["retry-after"]
        cancelled = http.post(f"/v1/videos/{first['id']}/cancel").json()
        assert cancelled["status"] == "failed" and cancelled["error"]["code"] == "cancelled"
        assert http.post("/v1/videos", json=body).status_code == 200  # room again
        assert http.get(f"/v1/videos/{first['id']}/content").status_code == 404


def test_cli_refuses_to_bind_beyond_loopback_without_a_key(capsys):
    from vidloom.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "8123"]) == 2
    assert "needs --api-key" in capsys.readouterr().err


def test_concurrent_jobs_share_steps_and_get_their_own_videos(client, server, tiny_generator):
    import httpx

    from vidloom.io import export_video

    # 30 steps each: long enough that the jobs overlap even on a loaded machine
    requests = [dict(prompt=f"a shape {i}", extra_body=dict(SMALL, seed=i, num_inference_steps=30)) for i in range(4)]
    before = httpx.get(f"{server.url}/metrics").text
    ids = [client.videos.create(size="48x32", **r).id for r in requests]
    videos = [client.videos.poll(i, poll_interval_ms=50) for i in ids]
    assert all(v.status == "completed" for v in videos)
    after = httpx.get(f"{server.url}/metrics").text

    def shared(text):
        line = next(line for line in text.splitlines() if line.startswith("vidloom_batch_size_count"))
        return float(line.split()[-1])

    assert shared(after) > shared(before)  # some denoising steps ran as one forward
    for video_id, r in zip(ids, requests):
        served = np.stack(decode_mp4(client.videos.download_content(video_id).read())).astype(np.float32)
        alone = tiny_generator.generate(r["prompt"], height=32, width=48, **r["extra_body"]).frames
        path = server.tmp / f"{video_id}-alone.mp4"
        export_video(alone, path, fps=16)
        reference = np.stack(decode_mp4(path.read_bytes())).astype(np.float32)
        assert np.abs(served - reference).mean() <= 0.5  # the same frames through the same encoder


def test_cancel_a_running_job(client, server):
    import httpx

    video = client.videos.create(prompt="a long one", size="48x32", extra_body=dict(SMALL, num_inference_steps=500))
    deadline = time.time() + 60
    while client.videos.retrieve(video.id).status != "in_progress":
        assert time.time() < deadline
        time.sleep(0.02)
    r = httpx.post(f"{server.url}/v1/videos/{video.id}/cancel")
    assert r.status_code == 200
    final = client.videos.poll(video.id, poll_interval_ms=50)
    assert final.status == "failed" and final.error.code == "cancelled"


def test_image_to_video_upload(tiny_wan_pipe, tmp_path):
    """input_reference through the official client on a TI2V folder (the image is the first frame):
    the served video equals the one generate(image=...) makes from the same file."""
    from openai import OpenAI
    from PIL import Image

    from vidloom import VideoGenerator
    from vidloom.io import export_video

    from ..parity.test_ti2v_parity import build_ti2v_folder

    folder = build_ti2v_folder(tiny_wan_pipe, tmp_path / "ti2v")
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32")
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB").save(image)
    server = Server(create_app(gen, ServeSettings(model_name="ti2v", data_dir=tmp_path / "data", poll_after_ms=50)))
    try:
        client = OpenAI(api_key="x", base_url=f"{server.url}/v1", max_retries=0)
        body = {"num_frames": 9, "num_inference_steps": 3, "seed": 5}
        with open(image, "rb") as f:
            video = client.videos.create_and_poll(prompt="a cat", size="96x64", input_reference=f,
                                                  extra_body=body, poll_interval_ms=50)
        assert video.status == "completed", video.error
        served = np.stack(decode_mp4(client.videos.download_content(video.id).read())).astype(np.float32)
    finally:
        server.stop()
    alone = gen.generate("a cat", image=str(image), height=64, width=96, **body).frames
    export_video(alone, tmp_path / "alone.mp4", fps=16)
    reference = np.stack(decode_mp4((tmp_path / "alone.mp4").read_bytes())).astype(np.float32)
    assert served.shape == reference.shape == (9, 64, 96, 3)
    assert np.array_equal(served, reference)  # the same frames through the same encoder


def test_a_chunked_body_is_cut_off_at_the_limit(tiny_generator, tmp_path):
    """No Content-Length (chunked): the bytes are counted as they arrive, a form with a large file
    is refused with 413 before the rest is read or spooled."""
    from fastapi.testclient import TestClient

    app = create_app(tiny_generator, ServeSettings(model_name="m", data_dir=tmp_path, max_body_bytes=10_000),
                     start_loop=False)

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"\r\n\r\n'
        for _ in range(100):
            yield b"\0" * 1000

    with TestClient(app, base_url="http://127.0.0.1") as http:
        r = http.post("/v1/videos", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        r = http.post("/v1/videos", content=(b"x" * 1000 for _ in range(20)), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert http.post("/v1/videos", json={"prompt": "a cat", "size": "48x32"}).status_code == 200
