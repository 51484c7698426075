#!/usr/bin/env python
"""tools/download_images.py against the seed's sequential requests loop, on a slow loopback server.

    python benchmarks/download.py [--images 200] [--latency_ms 50] [--workers 16]

A local HTTP server answers every request after --latency_ms (like a far-away image CDN) with one of
--images distinct poster-sized JPEGs. The seed's loop (one requests.Session, one GET after another,
write the body) and our tool (parallel workers, decode check, atomic rename, manifest) each fetch
all of them into an empty folder. Prints both times and the ratio (goal >= 8x).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(count: int) -> dict[str, bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:450, 0:300]
    images = {}
    for i in range(count):
        base = (x * (i % 7 + 1) + y * (i % 5 + 1)) % 256
        pixels = np.stack([base, base[::-1], (base + i * 37) % 256], axis=-1).astype(np.int16)
        pixels += rng.integers(-20, 20, pixels.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
        images[f"/t/p/w300/poster_{i:04d}.jpg"] = buffer.getvalue()
    return images


def start_server(images: dict[str, bytes], latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            time.sleep(latency)
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def seed_loop(csv_path: Path, url_prefix: str, out: Path) -> int:
    """The seed's script: csv.DictReader, one Session, GET each poster_path in turn, write it."""
    import requests

    count = 0
    session = requests.Session()
    with open(csv_path, encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            raw = row["poster_path"]
            if raw == "":
                continue
            response = session.get(url_prefix + raw)
            if response.status_code == 200:
                (out / raw.split("/")[-1]).write_bytes(response.content)
                count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="how many images to fetch (default: 200)")
    parser.add_argument("--latency_ms", type=float, default=50.0, help="server delay per request (default: 50)")
    parser.add_argument("--workers", type=int, default=16, help="our tool's --workers (default: 16)")
    args = parser.parse_args(argv)

    from tools.download_images import main as download_main

    images = make_images(args.images)
    server = start_server(images, args.latency_ms / 1000)
    prefix = f"http://127.0.0.1:{server.server_address[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing = tmp / "posters.csv"
        with open(listing, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["poster_path", "title"])
            writer.writerows([path, f"poster {i}"] for i, path in enumerate(images))
        (tmp / "seed").mkdir()
        start = time.perf_counter()
        saved = seed_loop(listing, prefix, tmp / "seed")
        seed_seconds = time.perf_counter() - start

        start = time.perf_counter()
        download_main([str(listing), "--url_prefix", prefix, "--output_dir", str(tmp / "ours"),
                       "--workers", str(args.workers), "--quiet"])
        our_seconds = time.perf_counter() - start
        ours = len([p for p in os.listdir(tmp / "ours") if p.endswith(".jpg")])
    server.shutdown()
    print(f"images: {args.images}, server latency {args.latency_ms:g} ms per request, cores: {os.cpu_count()}")
    print(f"seed sequential loop: {seed_seconds:6.2f} s ({saved} files, {args.images / seed_seconds:6.1f} img/s)")
    print(f"download_images.py:   {our_seconds:6.2f} s ({ours} files, {args.images / our_seconds:6.1f} img/s, "
          f"{args.workers} workers)")
    print(f"speed-up: {seed_seconds / our_seconds:.1f}x (goal >= 8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
