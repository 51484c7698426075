"""tools/download_images.py against a loopback HTTP server we control (no real network)."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.cli import run_main
from library.download_plan import PlanOptions, plan_downloads, resolve_url, sanitize_name
from library.url_lists import read_url_list
from tools import download_images


def image_bytes(fmt: str, size=(48, 32), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        hit = self.server.record_hit(path)
        route = self.server.routes.get(path)
        if route is None:
            return self.reply(404, b"<html>not found</html>", "text/html")
        route(self, hit)

    def reply(self, code, body=b"", content_type="image/jpeg", headers=(), length=None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        if length is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def record_hit(self, path):
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            return self.hits[path]

    def handle_error(self, request, client_address):
        pass  # the slow route writes to sockets the client already closed

    @property
    def base(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


JPEG = image_bytes("JPEG", seed=1)
PNG = image_bytes("PNG", seed=2)
BIG = image_bytes("PNG", size=(200, 200), seed=3)


def _routes():
    def ok(data, content_type="image/jpeg"):
        return lambda h, n: h.reply(200, data, content_type)

    def flaky(h, n):
        h.reply(500, b"oops", "text/plain") if n == 1 else h.reply(200, JPEG)

    def busy(h, n):
        h.reply(429, b"slow down", "text/plain", [("Retry-After", "0")]) if n == 1 else h.reply(200, PNG, "image/png")

    def slow(h, n):
        time.sleep(5.0)  # well past --timeout 2.5, so a busy machine cannot make it pass
        h.reply(200, JPEG)

    return {
        "/img/a.jpg": ok(JPEG),
        "/img/b.png": ok(PNG, "image/png"),
        "/img/noext": ok(PNG, "image/png"),
        "/flaky.jpg": flaky,
        "/busy.jpg": busy,
        "/slow.jpg": slow,
        "/page.jpg": ok(b"<html><body>Sorry, this poster is gone</body></html>", "text/html"),
        "/cut.jpg": lambda h, n: h.reply(200, JPEG[: len(JPEG) // 2], length=len(JPEG)),
        "/cutfile.jpg": ok(JPEG[: len(JPEG) // 2]),
        "/big.png": ok(BIG, "image/png"),
        "/to-ftp.jpg": lambda h, n: h.reply(302, b"", headers=[("Location", "ftp://127.0.0.1/a.jpg")]),
        "/to-file.jpg": lambda h, n: h.reply(302, b"", headers=[("Location", "file:///etc/passwd")]),
        "/moved.jpg": lambda h, n: h.reply(301, b"", headers=[("Location", "/img/a.jpg")]),
    }


@pytest.fixture
def server():
    srv = ImageServer(_routes())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# (poster_path, name, expected status, expected file, hits on the server for that path)
CASES = [
    ("/img/a.jpg", "", "ok", "a.jpg", 2),  # once more through /moved.jpg
    ("/img/b.png", "", "ok", "b.png", 3),
    ("/img/noext", "", "ok", "noext.png", 1),
    ("/flaky.jpg", "", "ok", "flaky.jpg", 2),
    ("/busy.jpg", "", "ok", "busy.jpg", 2),
    ("/missing.jpg", "", "http-404", "", 1),
    ("/slow.jpg", "", "timeout", "", 3),
    ("/page.jpg", "", "not-an-image", "", 1),
    ("/cut.jpg", "", "truncated", "", 3),
    ("/cutfile.jpg", "", "truncated", "", 1),
    ("/big.png", "", "too-large", "", 1),
    ("/to-ftp.jpg", "", "bad-redirect", "", 1),
    ("/to-file.jpg", "", "bad-redirect", "", 1),
    ("/moved.jpg", "", "ok", "moved.jpg", 1),
    ("", "", "no-url", "", 0),
    ("file:///etc/passwd", "", "bad-url", "", 0),
    ("/img/a.jpg", "", "duplicate-url", "a.jpg", 0),
    ("/img/b.png?v=2", "../../evil.png", "ok", "evil.png", 0),
    ("/img/b.png?v=3", "/abs/A.png", "ok", "A_1.png", 0),
]


def run_tool(tmp_path, server, out, extra=()):
    rows = [{"poster_path": p, "name": n, "title": f"title {i}"} for i, (p, n, *_rest) in enumerate(CASES)]
    for row, (path, name, *_rest) in zip(rows, CASES):
        if not name:
            row["name"] = ""
    listing = write_csv(tmp_path / "list.csv", rows)
    argv = [str(listing), "--url_prefix", server.base, "--output_dir", str(out), "--workers", "8",
            "--timeout", "2.5", "--retries", "2", "--backoff", "0.01", "--max_bytes", "20000",
            "--keep_columns", "title", "--quiet", *extra]
    assert download_images.main(argv) == 0
    return read_manifest(out / "manifest.csv")


def test_statuses_files_retries_and_resume(tmp_path, server):
    out = tmp_path / "images"
    # names come from the URL except where the "name" column says otherwise
    manifest = run_tool(tmp_path, server, out, ["--name_column", "name"])
    assert [m["row"] for m in manifest] == [str(i) for i in range(1, len(CASES) + 1)]
    for entry, (path, _name, status, file, _hits) in zip(manifest, CASES):
        assert (entry["status"], entry["file"]) == (status, file), path
        assert entry["title"] == f"title {int(entry['row']) - 1}"
    ok = [m for m in manifest if m["status"] == "ok"]
    assert all(int(m["width"]) > 0 and int(m["bytes"]) == (out / m["file"]).stat().st_size for m in ok)
    by_file = {m["file"]: m for m in ok}
    assert (int(by_file["a.jpg"]["width"]), int(by_file["a.jpg"]["height"])) == (48, 32)
    assert (out / "a.jpg").read_bytes() == JPEG and (out / "noext.png").read_bytes() == PNG
    for path, _name, _status, _file, hits in CASES:
        if hits:
            assert server.hits.get(path.split("?")[0]) == hits, path
    # exactly the good files, no temp files, nothing written outside the output folder
    expected = {c[3] for c in CASES if c[3]} | {"manifest.csv"}
    assert {p.name for p in out.iterdir()} == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "list.csv"]

    before = dict(server.hits)
    again = run_tool(tmp_path, server, out, ["--name_column", "name"])
    for first, second in zip(manifest, again):
        expected_status = "skipped-existing" if first["status"] == "ok" else first["status"]
        assert second["status"] == expected_status
        assert second["file"] == first["file"] and second["width"] == first["width"]
    for path in ("/img/a.jpg", "/img/b.png", "/flaky.jpg", "/busy.jpg", "/img/noext"):
        assert server.hits[path] == before[path]
    assert {p.name for p in out.iterdir()} == expected


def test_json_and_jsonl_lists(tmp_path, server):
    urls = [f"{server.base}/img/a.jpg", f"{server.base}/img/b.png"]
    (tmp_path / "cols.json").write_text(json.dumps({"url": urls, "caption": ["one", "two"]}))
    (tmp_path / "rows.json").write_text(json.dumps([{"url": urls[0], "caption": "three", "id": 7}]))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"url": urls[1] + "?x", "caption": "four", "id": 8}) + "\n\n")
    out = tmp_path / "out"
    (out / "b_1.png").mkdir(parents=True)  # a folder in the way: reported, not a crash
    argv = [str(tmp_path / n) for n in ("cols.json", "rows.json", "rows.jsonl")]
    argv += ["--url_column", "url", "--output_dir", str(out), "--keep_columns", "caption", "--quiet"]
    assert download_images.main(argv) == 0
    manifest = read_manifest(out / "manifest.csv")
    assert list(manifest[0]) == ["row", "url", "file", "status", "bytes", "width", "height", "caption"]
    assert [(m["file"], m["status"], m["caption"]) for m in manifest] == [
        ("a.jpg", "ok", "one"), ("b.png", "ok", "two"), ("a.jpg", "duplicate-url", "three"),
        ("", "write-error", "four"),
    ]
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b.png", "b_1.png", "manifest.csv"]


def test_missing_url_column_is_one_line_error(tmp_path, capsys):
    listing = write_csv(tmp_path / "tvs.csv", [{"id": "1", "poster": "/a.jpg"}])
    code = run_main(download_images.main, [str(listing), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "tvs.csv" in err and "'poster_path'" in err and "id, poster" in err and "--url_column" in err
    assert not (tmp_path / "o").exists()


def test_bad_json_shape_is_a_user_error(tmp_path, capsys):
    (tmp_path / "l.json").write_text(json.dumps({"url": ["a", "b"], "title": ["x"]}))
    code = run_main(download_images.main, [str(tmp_path / "l.json"), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "different lengths" in capsys.readouterr().err


def test_names_are_sanitised_and_unique(tmp_path):
    assert sanitize_name("../../etc/passwd") == "passwd"
    assert sanitize_name("C:\\Windows\\evil.jpg") == "evil.jpg"
    assert sanitize_name("..") == "" and sanitize_name(".hidden.jpg") == "hidden.jpg"
    assert sanitize_name('a<b>:c?.jpg') == "a_b__c_.jpg" and sanitize_name("CON.jpg") == "_CON.jpg"
    assert resolve_url("/x.jpg", "http://h/p/") == "http://h/p/x.jpg"
    assert resolve_url("x.jpg", "http://h/p") == "http://h/p/x.jpg"
    assert resolve_url("https://o/y.jpg", "http://h/p") == "https://o/y.jpg"
    listing = write_csv(tmp_path / "l.csv", [{"u": f"http://h/{i}/{n}"} for i, n in
                                             enumerate(["p.jpg", "P.png", "p.jpg", "..", "q"])])
    jobs = plan_downloads([read_url_list(listing)], PlanOptions(url_column="u"))
    assert [job.name for job in jobs] == ["p.jpg", "P_1.png", "p_2.jpg", "row4", "q"]
    assert all("/" not in job.name and not job.name.startswith(".") for job in jobs)


def test_tls_verification_is_on_unless_insecure(tmp_path):
    base = ["l.csv", "--output_dir", str(tmp_path)]
    assert download_images.parse_args(base).fetch.verify_tls is True
    assert download_images.parse_args(base + ["--insecure"]).fetch.verify_tls is False
