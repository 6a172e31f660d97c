"""``vidloom serve`` under faults and hostile clients, on loopback, bounded in time:

    python benchmarks/soak.py [--model DIR] [--clients 8] [--chaos-seconds 150] [--postgres]

A real ``vidloom serve`` process takes 8 concurrent clients: each submits a small good job and
polls it to the end, or (about 1 in 5) sends a hostile request (oversized or malformed fields,
text no store takes, a cross-site post, a foreign Host, a broken upload, a wrong content type,
deep JSON, ...). Meanwhile the script
  - kills the server with SIGKILL twice and starts it again on the same data folder,
  - fills the data folder's filesystem (a small tmpfs it mounts, where it may) and frees it,
  - with ``--postgres``: runs the server on a throwaway PostgreSQL (Debian's binaries) as its
    queue and restarts the database once (immediate stop, then start).
Then it stops submitting, waits for every accepted job (at most --drain-seconds) and prints:
accepted good jobs, completed exactly once, failed, lost (never finished), completed more than
once (two video files or two completions), started again after a kill, the hostile requests'
4xx, any hostile request accepted, and every 5xx other than a 503/507 during an outage.
Target: every accepted good job completes exactly once; no 5xx but 503/507.
The whole run is bounded (default about 5 minutes, at most 10).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine_description, write_result  # noqa: E402

import httpx  # noqa: E402

GOOD = {"size": "64x64", "num_frames": 9, "num_inference_steps": 6}
LIMIT_S = 600  # the whole run, whatever the options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- hostile requests: each returns an httpx response -------------------------------------------------------

def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return out.getvalue()


def hostile_requests(url: str, port: int):
    png = _png()
    json_headers = {"content-type": "application/json"}
    return {
        "huge negative_prompt": lambda c: c.post("/v1/videos", json={"prompt": "x",
                                                                     "negative_prompt": "blurry, " * 400_000}),
        "huge prompt (multipart)": lambda c: c.post("/v1/videos", files={"prompt": (None, "y" * 200_000)}),
        "lone surrogate": lambda c: c.post("/v1/videos", content=b'{"prompt": "a \\ud800"}', headers=json_headers),
        "NUL in prompt": lambda c: c.post("/v1/videos", content=b'{"prompt": "a \\u0000 b"}', headers=json_headers),
        "unicode digits in size": lambda c: c.post("/v1/videos", json={"prompt": "x", "size": "\u00b2x64"}),
        "deep JSON": lambda c: c.post("/v1/videos", content=b"[" * 100_000, headers=json_headers),
        "not JSON": lambda c: c.post("/v1/videos", content=b"{nope", headers=json_headers),
        "wrong content type": lambda c: c.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"}),
        "unknown field": lambda c: c.post("/v1/videos", json={"prompt": "x", "colour": "red"}),
        "bad size": lambda c: c.post("/v1/videos", json={"prompt": "x", "size": "63x64"}),
        "steps out of range": lambda c: c.post("/v1/videos", json={"prompt": "x", "num_inference_steps": 10**9}),
        "NaN guidance": lambda c: c.post("/v1/videos", json={"prompt": "x", "guidance_scale": "nan"}),
        "image for a text-to-video model": lambda c: c.post("/v1/videos", data={"prompt": "x"},
                                                            files={"input_reference": ("a.png", png, "image/png")}),
        "broken upload": lambda c: c.post("/v1/videos", data={"prompt": "x"},
                                          files={"input_reference": ("a.png", b"\x89PNG broken", "image/png")}),
        "invalid UTF-8 field": lambda c: c.post(
            "/v1/videos", content=b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n\xff\xfe\xc3(\r\n--b--\r\n',
            headers={"content-type": "multipart/form-data; boundary=b"}),
        "cross-site post": lambda c: c.post("/v1/videos", data={"prompt": "x"},
                                            headers={"origin": "http://evil.example"}),
        "foreign Host": lambda c: c.get("/v1/videos", headers={"host": "attacker.example"}),
        "limit=abc": lambda c: c.get("/v1/videos", params={"limit": "abc"}),
        "unknown video": lambda c: c.get("/v1/videos/video_" + "0" * 24),
        "content of an unknown video": lambda c: c.get("/v1/videos/video_nope/content"),
        "PUT": lambda c: c.put("/v1/videos"),
    }


# -- the server, the filesystem, the database ---------------------------------------------------------------

class Server:
    def __init__(self, model: Path, data_dir: Path, port: int, store: str | None, log: Path):
        self.cmd = [sys.executable, "-m", "vidloom", "serve", "--model", str(model), "--port", str(port),
                    "--data-dir", str(data_dir), "--max-queue", "1000"]
        if store:
            self.cmd += ["--store", store, "--lease-seconds", "5"]
        self.url, self.log, self.proc = f"http://127.0.0.1:{port}", log, None
        self.up = threading.Event()

    def start(self, timeout: float = 180) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.up.set()
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); see {self.log}")
            time.sleep(0.2)
        raise SystemExit(f"the server did not start in {timeout:g} s; see {self.log}")

    def kill9(self) -> None:
        self.up.clear()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        self.up.clear()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def mount_small_fs(root: Path, size_mb: int) -> bool:
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(root)],
                          capture_output=True).returncode == 0


def fill(root: Path) -> Path:
    filler = root / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


class Postgres:
    """A throwaway PostgreSQL on loopback (Debian's binaries; as the postgres user when root)."""

    def __init__(self, root: Path):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            raise SystemExit("--postgres needs Debian's postgresql package")
        self.bin, self.root, self.port = bins[-1], root, free_port()
        self.data = root / "pgdata"
        self.as_user = []
        sockets = root / "sockets"
        sockets.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(sockets, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.as_user, f"{self.bin}/initdb", "-D", str(self.data), "-A", "trust", "-U", "vidloom",
                        "--no-sync"], check=True, capture_output=True)
        self.options = f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1"
        self.start()
        self.dsn = f"postgresql://vidloom@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run([*self.as_user, f"{self.bin}/pg_ctl", "-D", str(self.data), "-w", "-l",
                        str(self.root / "log"), "-o", self.options, "start"], check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run([*self.as_user, f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)


# -- the clients ---------------------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.accepted: list[str] = []
        self.statuses = collections.Counter()  # (kind, status) -> count
        self.unexpected: list[str] = []  # 5xx outside an outage, hostile requests accepted
        self.hostile_accepted: list[str] = []

    def add(self, kind: str, status: int | str, note: str = "") -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1
            if isinstance(status, int) and status >= 500 and status not in (503, 507):
                self.unexpected.append(f"{kind}: {status} {note[:200]}")


def client(index: int, server: Server, stop: threading.Event, tally: Tally, hostile_ratio: float, seed: int):
    rng = random.Random(seed + index)
    attacks = hostile_requests(server.url, 0)
    names = sorted(attacks)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        while not stop.is_set():
            if not server.up.wait(1):
                continue
            try:
                if rng.random() < hostile_ratio:
                    name = rng.choice(names)
                    r = attacks[name](http)
                    tally.add("hostile", r.status_code, r.text)
                    if r.status_code == 200 and r.request.method == "POST":
                        tally.hostile_accepted.append(name)
                    continue
                body = {"prompt": f"a red circle moving right {index}-{rng.randrange(10**6)}", **GOOD,
                        "seed": rng.randrange(1000)}
                r = http.post("/v1/videos", json=body)
                tally.add("good", r.status_code, r.text)
                if r.status_code != 200:
                    time.sleep(0.5)  # 503/507 (an outage) or 429: the client tries again later
                    continue
                video = r.json()
                with tally.lock:
                    tally.accepted.append(video["id"])
                while not stop.is_set():  # poll it to the end (or until the run stops)
                    time.sleep(0.2)
                    try:
                        v = http.get(f"/v1/videos/{video['id']}")
                    except httpx.HTTPError as exc:  # the server is down (killed) for a moment
                        tally.add("connection", type(exc).__name__)
                        time.sleep(0.3)
                        continue
                    tally.add("poll", v.status_code, v.text)
                    if v.status_code == 200 and v.json()["status"] in ("completed", "failed"):
                        break
            except httpx.HTTPError as exc:  # the server was killed under this request
                tally.add("connection", type(exc).__name__)
                time.sleep(0.2)


# -- the run -------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hostile-ratio", type=float, default=0.2)
    parser.add_argument("--chaos-seconds", type=float, default=150, help="how long clients submit (faults included)")
    parser.add_argument("--drain-seconds", type=float, default=120, help="at most this long for accepted jobs")
    parser.add_argument("--postgres", action="store_true", help="queue in a throwaway PostgreSQL, restarted once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.chaos_seconds + args.drain_seconds > LIMIT_S - 60:
        raise SystemExit(f"--chaos-seconds + --drain-seconds: at most {LIMIT_S - 60} s (the run is bounded)")
    from vidloom.default_model import DEFAULT_MODEL_DIR

    model = args.model or DEFAULT_MODEL_DIR
    began = time.time()
    work = Path(tempfile.mkdtemp(prefix="vidloom-soak-"))
    work.chmod(0o755)  # the database runs as the postgres user
    fs_root = work / "fs"
    mounted = mount_small_fs(fs_root, 48)
    data_dir = fs_root / "data"
    pg = Postgres(work / "pg") if args.postgres else None
    server = Server(model, data_dir, free_port(), pg.dsn if pg else None, work / "server.log")
    events: list[str] = []

    def event(text: str) -> None:
        events.append(f"{time.time() - began:6.1f} s  {text}")
        print(events[-1], flush=True)

    server.start()
    event(f"server up ({'tmpfs data folder' if mounted else 'plain data folder: no filling (mount refused)'}"
          f"{', PostgreSQL queue' if pg else ''})")
    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client, args=(i, server, stop, tally, args.hostile_ratio, args.seed),
                                daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    chaos = args.chaos_seconds
    plan = [(0.15 * chaos, "kill"), (0.35 * chaos, "fill"), (0.55 * chaos, "kill")]
    if pg:
        plan.append((0.75 * chaos, "db"))
    start = time.time()
    for at, what in plan:
        time.sleep(max(0.0, start + at - time.time()))
        if what == "kill":
            server.kill9()
            event("server killed (SIGKILL)")
            server.start()
            event("server restarted")
        elif what == "fill" and mounted:
            filler = fill(fs_root)
            event("data filesystem full")
            time.sleep(min(10.0, 0.1 * chaos))
            filler.unlink()
            event("data filesystem freed")
        elif what == "db":
            pg.stop()
            event("database stopped (immediate)")
            time.sleep(5)
            pg.start()
            event("database started")
    time.sleep(max(0.0, start + chaos - time.time()))
    stop.set()
    for t in threads:
        t.join(70)
    event(f"clients stopped; {len(tally.accepted)} good jobs accepted; waiting for them")
    deadline = time.time() + args.drain_seconds
    final = {}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        pending = list(tally.accepted)
        while pending and time.time() < deadline:
            still = []
            for job_id in pending:
                r = http.get(f"/v1/videos/{job_id}")
                if r.status_code == 200 and r.json()["status"] in ("completed", "failed"):
                    final[job_id] = r.json()
                else:
                    still.append(job_id)
            pending = still
            time.sleep(0.5)
    code = server.stop()
    event(f"server stopped with SIGTERM (exit {code})")
    # what the store and the videos folder say
    if pg:
        from vidloom.serve.pg_store import PostgresJobStore

        store = PostgresJobStore(pg.dsn)
    else:
        from vidloom.serve.store import SQLiteJobStore

        store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    files = collections.Counter(p.name.split(".")[0] for p in (data_dir / "videos").iterdir()
                                if not p.name.startswith("."))
    completed = failed = lost = twice = restarted = 0
    failures = []
    for job_id in tally.accepted:
        job = store.get(job_id)
        if job is None or job.status not in ("completed", "failed"):
            lost += 1
            continue
        restarted += job.attempts > 1
        if job.status == "completed":
            completed += 1
            twice += files[job_id] > 1
        else:
            failed += 1
            failures.append(f"{job_id}: {job.error_code} {job.error_message}"[:200])
    store.close()
    if pg:
        pg.stop()
    if mounted:
        subprocess.run(["umount", "-l", str(fs_root)])
    log = (work / "server.log").read_text(errors="replace")
    held = {"video writes held for a full disk": log.count("the video cannot be written yet"),
            "store outages seen by the engine loop": log.count("job store unavailable"),
            "jobs handed back at SIGTERM": log.count("back in the queue")}
    hostile = {s: n for (k, s), n in tally.statuses.items() if k == "hostile"}
    good = {s: n for (k, s), n in tally.statuses.items() if k == "good"}
    polls = {s: n for (k, s), n in tally.statuses.items() if k == "poll"}
    figures = {
        "machine": machine_description(), "clients": args.clients, "chaos_seconds": args.chaos_seconds,
        "postgres": bool(pg), "filled_data_fs": mounted, "events": events,
        "accepted_good": len(tally.accepted), "completed_once": completed - twice, "failed": failed,
        "lost": lost, "completed_twice": twice, "restarted_after_kill": restarted,
        "good_responses": {str(k): v for k, v in sorted(good.items(), key=str)},
        "hostile_responses": {str(k): v for k, v in sorted(hostile.items(), key=str)},
        "poll_responses": {str(k): v for k, v in sorted(polls.items(), key=str)},
        "hostile_accepted": tally.hostile_accepted, "unexpected_5xx": tally.unexpected,
        "connection_errors": sum(n for (k, _), n in tally.statuses.items() if k == "connection"),
        "failures": failures[:10], "server_log": held, "seconds": round(time.time() - began, 1),
    }
    print()
    print(f"soak: {args.clients} clients, {args.chaos_seconds:g} s of submissions, 2 SIGKILLs"
          f"{', data filesystem filled and freed' if mounted else ''}{', database restarted' if pg else ''}")
    print(f"  accepted good jobs      {figures['accepted_good']}")
    print(f"  completed exactly once  {figures['completed_once']}")
    print(f"  failed                  {failed}")
    print(f"  lost                    {lost}")
    print(f"  completed twice         {twice}")
    print(f"  started again after a kill (attempts > 1): {restarted}")
    print(f"  good requests by status {figures['good_responses']}; polls by status {figures['poll_responses']}")
    print(f"  hostile requests by status {figures['hostile_responses']} (accepted: {len(tally.hostile_accepted)})")
    print(f"  5xx other than 503/507  {len(tally.unexpected)}" + (f": {tally.unexpected[:3]}" if tally.unexpected else ""))
    print(f"  requests refused while the server was down: {figures['connection_errors']}; "
          f"whole run {figures['seconds']} s")
    print(f"  server log: {held}")
    ok = (lost == 0 and twice == 0 and failed == 0 and not tally.unexpected and not tally.hostile_accepted
          and figures["completed_once"] == figures["accepted_good"] > 0)
    print(f"  target (every accepted good job completed exactly once, no 5xx but 503/507): {'MET' if ok else 'MISSED'}")
    if failures:
        print("  failures:", *failures[:5], sep="\n    ")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    write_result("soak" + ("-postgres" if pg else ""), figures)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
