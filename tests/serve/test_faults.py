"""``vidloom serve`` under bad input and store faults, in one process (a real HTTP server on
loopback or Starlette's test client): every refusal is a 4xx with the OpenAI error object naming
the field, store trouble is a 503/507 with Retry-After, nothing is left behind, and the server
goes on serving."""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import threading
import time

import httpx
import pytest

from vidloom.config import MAX_PROMPT_CHARS, SamplingParams
from vidloom.errors import InvalidRequestError
from vidloom.serve.app import ServeSettings, create_app, is_loopback
from vidloom.serve.store import FAILED, QUEUED, Job, SQLiteJobStore, StoreUnavailable

from .test_api import SMALL, Server

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture
def served(tiny_generator, tmp_path):
    """A server on loopback with its engine loop, on a fresh data folder."""
    settings = ServeSettings(model_name="tiny-wan", data_dir=tmp_path / "data", poll_after_ms=50, body_timeout_s=2)
    server = Server(create_app(tiny_generator, settings))
    server.data_dir = tmp_path / "data"
    yield server
    server.stop()
    server.server.config.app.state.store.close()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}  # the OpenAI error object
    return error


def test_every_text_field_is_bounded_before_any_work(served):
    big = "blurry, " * (MAX_PROMPT_CHARS // 8 + 1)
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for body in ({"prompt": "a cat", "negative_prompt": big}, {"prompt": big}):
            field = "negative_prompt" if "negative_prompt" in body else "prompt"
            assert _error(http.post("/v1/videos", json=body), 400)["param"] == field
            # the same through multipart, as the openai client sends it
            r = http.post("/v1/videos", files={k: (None, v) for k, v in body.items()})
            assert _error(r, 400)["param"] == field
        # text no store or tokenizer takes: a lone surrogate, a NUL
        for text in ('"a \\ud800 cat"', '"a \\u0000 cat"'):
            r = http.post("/v1/videos", content=b'{"prompt": "x", "negative_prompt": ' + text.encode() + b"}",
                          headers={"content-type": "application/json"})
            assert _error(r, 400)["param"] == "negative_prompt"
        assert http.get("/v1/videos").json()["data"] == []  # nothing was accepted
    with pytest.raises(InvalidRequestError, match="negative_prompt"):  # the Python API holds the same bound
        SamplingParams(prompt="a cat", negative_prompt=big).validate()


def test_inputs_the_parser_did_not_expect_are_400s(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        r = http.post("/v1/videos", content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert _error(r, 400)["code"] == "invalid_json"
        for size in ("²x64", "48x³2", "48x32" + " " * 60 + "9"):
            assert _error(http.post("/v1/videos", json={"prompt": "a cat", "size": size}), 400)["param"] == "size"
        # invalid UTF-8 in a multipart text field is refused, not read as Latin-1
        body = (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n\xff\xfe\xc3\x28 bad\r\n--b--\r\n')
        r = http.post("/v1/videos", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
        assert "prompt" in _error(r, 400)["message"]
        # query parameters of the wrong type: the OpenAI error object, not FastAPI's {"detail": ...}
        assert _error(http.get("/v1/videos", params={"limit": "abc"}), 400)["param"] == "limit"
        # every method the path takes is in Allow
        r = http.put("/v1/videos")
        _error(r, 405)
        assert {"GET", "POST"} <= {m.strip() for m in r.headers["allow"].split(",")}
        assert _error(http.get("/no/such/route"), 404)["code"] == "not_found"
        assert http.get("/health").json()["status"] == "ok"


def test_a_keyless_server_answers_only_its_own_host_and_origin(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        # DNS rebinding: a foreign name resolving to this machine
        assert _error(http.get("/v1/videos", headers={"host": "attacker.example"}), 403)["code"] == "forbidden_origin"
        # a cross-site form post (no preflight): refused before it is read
        r = http.post("/v1/videos", data={"prompt": "a cat"}, headers={"origin": "http://evil.example"})
        _error(r, 403)
        r = http.post("/v1/videos", data={"prompt": "a cat"}, headers={"origin": f"http://127.0.0.1:{served.port + 1}"})
        _error(r, 403)
        assert http.get("/v1/videos").json()["data"] == []
        # the page itself, and its own origin, are served
        r = http.post("/v1/videos", json={"prompt": "a cat", "size": "48x32", **SMALL},
                      headers={"origin": served.url})
        assert r.status_code == 200
        assert http.get("/v1/videos", headers={"host": f"localhost:{served.port}"}).status_code == 200
        page = http.get("/")
        assert "script-src 'sha256-" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"


def test_with_an_api_key_any_host_may_call(tiny_generator, tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(tiny_generator, ServeSettings(model_name="m", data_dir=tmp_path, api_key="k"), start_loop=False)
    with TestClient(app, base_url="http://video.example.com") as http:
        r = http.get("/v1/models", headers={"authorization": "Bearer k", "origin": "https://app.example.com"})
        assert r.status_code == 200


def test_a_slow_body_is_cut_off(served):
    """Headers, then a declared 100 KB body at a byte a second: 408 once body_timeout_s (2 s here) passes."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        conn.settimeout(0.5)
        reply = b""
        for i in range(60):
            try:
                conn.sendall(b"{" if i == 0 else b" ")
                reply += conn.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if reply:
                break
    assert reply.split(b" ", 2)[1] == b"408", reply[:200]


def test_refused_uploads_leave_no_file_and_name_no_server_path(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        r = http.post("/v1/videos", data={"prompt": "a cat"}, files={"input_reference": ("a.png", b"not an image")})
        error = _error(r, 400)
        assert str(served.data_dir) not in error["message"] and "/" not in error["message"].split("(")[0]
    assert list((served.data_dir / "inputs").iterdir()) == []


def test_a_store_outage_is_503_and_nothing_is_left_behind(tiny_generator, tmp_path):
    """The store refuses the write (another process holds SQLite's write lock past the busy
    timeout): 503 with Retry-After, the upload is removed, and /health answers meanwhile (the
    store call waits in a worker thread, not on the event loop)."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    store = SQLiteJobStore(data / "jobs.sqlite3", busy_timeout_s=3)
    # an image-to-video model is not needed: the upload is written before the model checks it
    server = Server(create_app(tiny_generator, ServeSettings(model_name="tiny-wan", data_dir=data), store=store,
                               start_loop=False))
    holder = sqlite3.connect(str(data / "jobs.sqlite3"), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, format="PNG")
        result = {}

        def create():
            result["create"] = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a cat", "size": "48x32"},
                                          timeout=30)
            result["created_at"] = time.monotonic()

        thread = threading.Thread(target=create)
        thread.start()
        time.sleep(0.5)
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        health_at = time.monotonic()
        thread.join(30)
        assert health_at < result["created_at"]  # /health answered while the create was still waiting
        error = _error(result["create"], 503)
        assert error["code"] == "store_unavailable" and result["create"].headers["retry-after"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # the store is back: the same request is accepted
    assert httpx.post(f"{server.url}/v1/videos", json={"prompt": "a cat", "size": "48x32"}, timeout=30).status_code \
        == 200
    server.stop()
    store.close()


def test_a_failed_record_removes_the_upload(tiny_generator, tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    class Refusing(SQLiteJobStore):
        def add(self, job):
            raise StoreUnavailable("database or disk is full", full=True)

    data = tmp_path / "data"
    data.mkdir()
    app = create_app(tiny_generator, ServeSettings(model_name="m", data_dir=data),
                     store=Refusing(data / "jobs.sqlite3"), start_loop=False)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with TestClient(app, base_url="http://127.0.0.1") as http:
        # a corrupt image whose decoder raises neither OSError nor ValueError (BLP: NotImplementedError)
        blp = b"BLP1" + b"\x09\x00\x00\x00" + b"\x01\x00\x00\x00" * 6 + b"\x00" * 2000
        r = http.post("/v1/videos", data={"prompt": "a cat"}, files={"input_reference": ("a.blp", blp)})
        assert _error(r, 400)["param"] == "image"
        r = http.post("/v1/videos", json={"prompt": "a cat", "size": "48x32"})
        assert _error(r, 507)["code"] == "insufficient_storage" and r.headers["retry-after"]
    assert list((data / "inputs").iterdir()) == []


def test_a_damaged_row_fails_that_job_alone(served):
    store = served.server.config.app.state.store
    store.add(Job(id="video_damaged", status=QUEUED, model="tiny-wan", prompt="x", seconds="1", size="48x32",
                  request={"prompt": "x"}, inputs={}, created_at=time.time()))
    store._execute("UPDATE jobs SET request = ? WHERE id = ?", ("{not json", "video_damaged"))
    with httpx.Client(base_url=served.url, timeout=30) as http:
        listed = http.get("/v1/videos")
        assert listed.status_code == 200
        good = http.post("/v1/videos", json={"prompt": "a dog", "size": "48x32", **SMALL}).json()
        deadline = time.time() + 60
        while http.get(f"/v1/videos/{good['id']}").json()["status"] not in ("completed", "failed"):
            assert time.time() < deadline
            time.sleep(0.1)
        assert http.get(f"/v1/videos/{good['id']}").json()["status"] == "completed"
        damaged = http.get("/v1/videos/video_damaged").json()
    assert damaged["status"] == FAILED and damaged["error"]["code"] == "corrupt_record"
    row = store._execute("SELECT status, error_code FROM jobs WHERE id = ?", ("video_damaged",), fetch="one")
    assert tuple(row) == (FAILED, "corrupt_record")  # recorded, not left in progress


def test_the_openapi_document_describes_bodies_and_errors(served):
    spec = httpx.get(f"{served.url}/openapi.json", timeout=30).json()
    create = spec["paths"]["/v1/videos"]["post"]
    body = create["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert {"prompt", "negative_prompt", "input_reference"} <= set(body["multipart/form-data"]["schema"]["properties"])
    assert {"400", "413", "415", "429", "503"} <= set(create["responses"])
    assert "422" not in json.dumps(spec["paths"])
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "video/mp4" in spec["paths"]["/v1/videos/{video_id}/content"]["get"]["responses"]["200"]["content"]


def test_loopback_is_decided_by_the_resolved_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    # spelled like loopback, but a name (resolving elsewhere, or not at all here)
    assert not is_loopback("127.0.0.1.nip.io")
    assert not is_loopback("127.probe.invalid")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("")
