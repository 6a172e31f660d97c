"""The server takes ``cache`` per request and its Video object says what the cache did; a store
made before the report column existed is upgraded in place and keeps its jobs."""

from __future__ import annotations

import json
import sqlite3
import urllib.request

import pytest

from vidloom.serve.app import ServeSettings, create_app
from vidloom.serve.store import COLUMNS_SQL, SQLiteJobStore

from .test_api import SMALL, Server

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def test_a_cached_job_reports_what_its_cache_did(tiny_generator, tmp_path):
    from openai import OpenAI

    server = Server(create_app(tiny_generator, ServeSettings(model_name="tiny-wan", data_dir=tmp_path,
                                                             poll_after_ms=50)))
    try:
        client = OpenAI(api_key="unused-on-loopback", base_url=f"{server.url}/v1", max_retries=0)
        body = dict(SMALL, num_inference_steps=4)
        cached = client.videos.create_and_poll(prompt="a cat", size="48x32", poll_interval_ms=50,
                                               extra_body=dict(body, cache="block:F1B0:10+cfg-gate:0.5"))
        plain = client.videos.create_and_poll(prompt="a cat", size="48x32", poll_interval_ms=50, extra_body=body)
        assert cached.status == plain.status == "completed"
        with urllib.request.urlopen(f"{server.url}/v1/videos/{cached.id}") as reply:
            video = json.loads(reply.read())
        with urllib.request.urlopen(f"{server.url}/v1/videos/{plain.id}") as reply:
            assert "cache" not in json.loads(reply.read())
    finally:
        server.stop()
    report = video["cache"]
    # 4 steps, 2 blocks, the gate from step 2 on: forwards cond+uncond at steps 0-1, cond alone at 2-3;
    # the second block runs at step 0 (both branches) and step 3 (cond), skipped at 1 (both) and 2 (cond)
    assert report["uncond_skipped"] == 2 and report["forwards"] == 6
    assert report["blocks_skipped"] == 3 and report["blocks_computed"] == 6 + 3


def test_a_store_from_before_the_report_column_is_upgraded(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    old_columns = COLUMNS_SQL.replace(",\n    report TEXT", "")
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT,{old_columns})")
        db.execute("INSERT INTO jobs (id, status, model, prompt, seconds, size, request, inputs, created_at, owner) "
                   "VALUES ('video_1', 'in_progress', 'm', 'a cat', '1', '48x32', '{\"prompt\": \"a cat\"}', '{}', "
                   "1.0, 'me')")
    store = SQLiteJobStore(path)
    try:
        assert store.get("video_1").report is None
        assert store.complete("video_1", "me", "out.mp4", {"forwards": 6.0, "blocks_skipped": 2.0})
        assert store.get("video_1").report == {"forwards": 6.0, "blocks_skipped": 2.0}
    finally:
        store.close()
