"""Bad-input corpus for tools/ and the taggers, and safe loading.

- download_images.py: a list without the URL column, non-http schemes, ``../`` in URL paths and
  names, redirects to other schemes, an output folder blocked by a file.
- tag_images_by_wd14_tagger.py: a tagger folder without selected_tags.csv.
- show_metadata.py / convert_sdxl.py: truncated and SD 1.x checkpoints.
- Safe loading: a ``.ckpt``/``.pth`` whose unpickling would run code is refused by the model loader
  and by evaluate.py's aesthetic loader, and the code is not run; no ``eval``/``exec`` anywhere.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import bad_inputs as B

DOWNLOAD = "tools/download_images.py"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)
        if self.path.startswith("/redirect-"):
            target = {"file": "file:///etc/passwd", "ftp": "ftp://127.0.0.1/x.png"}[self.path.split("-", 1)[1]]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.server.png)))
        self.end_headers()
        self.wfile.write(self.server.png)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.paths = []
    buffer = io.BytesIO()
    B._rgb(48, 32).save(buffer, format="PNG")
    srv.png = buffer.getvalue()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_download_csv_without_url_column(tmp_path):
    listing = write_csv(tmp_path / "list.csv", ["name", "url"], [["a", "http://127.0.0.1:9/a.png"]])
    result = B.run_cli(DOWNLOAD, [listing, "--output_dir", tmp_path / "out"], inputs=[listing])
    B.assert_user_error(result, str(listing), "poster_path", "--url_column")
    assert not (tmp_path / "out").exists()


def test_download_refuses_non_http_schemes(tmp_path, server):
    urls = ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/x.png", "data:image/png;base64,AAAA"]
    listing = write_csv(tmp_path / "list.csv", ["poster_path"], [[u] for u in urls])
    out = tmp_path / "out"
    hits = len(server.paths)
    result = B.run_cli(DOWNLOAD, [listing, "--output_dir", out, "--quiet", "--retries", "0"], inputs=[listing])
    output = B.assert_handled(result)
    assert [row["status"] for row in manifest(out)] == ["bad-url"] * len(urls)
    assert "failed 4 (bad-url 4)" in output
    assert files_under(out) == {"manifest.csv"} and len(server.paths) == hits


def test_download_redirect_to_other_scheme_is_not_followed(tmp_path, server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing = write_csv(tmp_path / "list.csv", ["poster_path"], [[f"{base}/redirect-file"], [f"{base}/redirect-ftp"]])
    out = tmp_path / "out"
    result = B.run_cli(DOWNLOAD, [listing, "--output_dir", out, "--quiet", "--retries", "0"], inputs=[listing])
    B.assert_handled(result)
    assert [row["status"] for row in manifest(out)] == ["bad-redirect", "bad-redirect"]
    assert files_under(out) == {"manifest.csv"}


def test_download_never_writes_outside_output_dir(tmp_path, server):
    """``../`` in URL paths, in the --url_prefix'ed relative paths and in the name column."""
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [
        [f"{base}/a/../../../escape1.png", ""],
        ["/../../escape2.png", ""],
        [f"{base}/x/%2e%2e/%2e%2e/escape3.png", ""],
        [f"{base}/ok.png", "../../escape4.png"],
        [f"{base}/ok2.png", "/tmp/escape5.png"],
    ]
    listing = write_csv(tmp_path / "list.csv", ["poster_path", "name"], rows)
    work = tmp_path / "a" / "b"
    out = work / "out"
    result = B.run_cli(DOWNLOAD, [listing, "--output_dir", out, "--url_prefix", base, "--name_column", "name",
                                  "--quiet", "--retries", "0"], inputs=[listing])  # fmt: skip
    output = B.assert_handled(result)
    assert "downloaded 5" in output
    saved = files_under(tmp_path)
    inside = {name for name in saved if name.startswith("a/b/out/")}
    assert saved - inside == {"list.csv"}  # nothing next to or above the output folder
    assert all("/" not in row["file"] and ".." not in row["file"] for row in manifest(out))
    assert not Path("/tmp/escape5.png").exists()


def test_download_output_dir_is_a_file(tmp_path):
    listing = write_csv(tmp_path / "list.csv", ["poster_path"], [["http://127.0.0.1:9/a.png"]])
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder", encoding="utf-8")
    result = B.run_cli(DOWNLOAD, [listing, "--output_dir", blocker], inputs=[listing, blocker])
    B.assert_user_error(result, str(blocker), "output folder")


def test_download_zero_workers(tmp_path):
    listing = write_csv(tmp_path / "list.csv", ["poster_path"], [["http://127.0.0.1:9/a.png"]])
    result = B.run_cli(DOWNLOAD, [listing, "--output_dir", tmp_path / "out", "--workers", "0"], inputs=[listing])
    B.assert_user_error(result, "--workers")


# --- taggers ----------------------------------------------------------------------------------------


def test_wd14_folder_without_selected_tags(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    B.good_png(images / "a.png")
    model_dir = tmp_path / "taggers"
    folder = model_dir / "SmilingWolf_wd-v1-4-convnext-tagger-v2"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\x08\x07")  # never opened: the tag list is checked first
    result = B.run_cli("finetune/tag_images_by_wd14_tagger.py", [images, "--model_dir", model_dir],
                       inputs=[images, model_dir])  # fmt: skip
    B.assert_user_error(result, str(folder), "selected_tags.csv")
    assert not list(images.glob("*.txt"))


# --- model files --------------------------------------------------------------------------------------


def test_show_metadata_truncated_safetensors(tiny_sdxl, tmp_path):
    model = B.truncated_safetensors(tiny_sdxl["single_file"], tmp_path / "cut.safetensors")
    result = B.run_cli("tools/show_metadata.py", [model], inputs=[model])
    B.assert_user_error(result, str(model), "truncated")


def test_show_metadata_not_safetensors(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_text("<html>rate limited</html>", encoding="utf-8")
    result = B.run_cli("tools/show_metadata.py", [model], inputs=[model])
    B.assert_user_error(result, str(model))


def test_convert_sd1_checkpoint(tiny_sdxl, tmp_path):
    model = B.sd1_checkpoint(tmp_path / "sd15.safetensors")
    result = B.run_cli("tools/convert_sdxl.py", [model, tmp_path / "out.safetensors", "--tokenizer_cache_dir",
                                                  tiny_sdxl["tokenizers"]], inputs=[model])  # fmt: skip
    B.assert_user_error(result, str(model), "1.x")
    assert not (tmp_path / "out.safetensors").exists()


# --- safe loading ---------------------------------------------------------------------------------------


@pytest.fixture
def live_pickle(tmp_path):
    """Proof that the payload really runs when loaded unsafely: then the refusals below mean something."""
    import torch

    marker = tmp_path / "ran-unsafe"
    bomb = B.pickle_bomb(tmp_path / "probe.ckpt", marker)
    torch.load(str(bomb), weights_only=False)
    assert marker.read_text() == "pwned"
    return tmp_path


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_model_loader_refuses_pickled_code(live_pickle, tiny_sdxl, suffix):
    marker = live_pickle / "ran"
    bomb = B.pickle_bomb(live_pickle / f"model{suffix}", marker)
    result = B.run_cli("tools/convert_sdxl.py", [bomb, live_pickle / "out.safetensors", "--tokenizer_cache_dir",
                                                 tiny_sdxl["tokenizers"]], inputs=[bomb])  # fmt: skip
    B.assert_user_error(result, str(bomb), "cannot be read safely")
    assert not marker.exists()


def test_model_loader_refuses_pickled_code_in_process(live_pickle):
    from library.errors import ModelError
    from library.sdxl_model_util import read_checkpoint

    marker = live_pickle / "ran"
    bomb = B.pickle_bomb(live_pickle / "model.ckpt", marker)
    with pytest.raises(ModelError, match="cannot be read safely"):
        read_checkpoint(bomb)
    assert not marker.exists()


def test_aesthetic_loader_refuses_pickled_code(live_pickle):
    images = live_pickle / "images" / "base"
    images.mkdir(parents=True)
    B.good_png(images / "base-0-0.png")
    prompts = live_pickle / "prompts.txt"
    prompts.write_text("a movie poster\n", encoding="utf-8")
    marker = live_pickle / "ran"
    bomb = B.pickle_bomb(live_pickle / "sac+logos+ava1-l14-linearMSE.pth", marker)
    result = B.run_cli("tools/evaluate.py", ["score", "--images_root", images.parent, "--prompts", prompts,
                                             "--aesthetic_model", bomb, "--output_dir", live_pickle / "scores",
                                             "--clip_model", live_pickle / "no-clip"],
                       inputs=[images.parent, prompts, bomb])  # fmt: skip
    B.assert_user_error(result, str(bomb), "never run")
    assert not marker.exists()


_CALL = re.compile(r"(?<![\w.])(eval|exec)\s*\(")


def _python_sources() -> list[Path]:
    root = B.REPO_ROOT
    files = [root / "sdxl_train.py"]
    for folder in ("library", "tools", "finetune"):
        files += sorted((root / folder).rglob("*.py"))
    return files


def test_no_eval_or_exec_of_user_text():
    """Config values and optimizer args are parsed literally; nothing calls eval()/exec()."""
    offenders = []
    for path in _python_sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if _CALL.search(code):
                offenders.append(f"{path.relative_to(B.REPO_ROOT)}:{number}: {line.strip()}")
    assert len(_python_sources()) > 40
    assert offenders == []


def test_the_eval_grep_can_fail():
    assert _CALL.search("value = eval(text)") and _CALL.search("exec (code)")
    assert not _CALL.search("ast.literal_eval(text)") and not _CALL.search("model.eval()")


def test_optimizer_args_are_parsed_literally(tmp_path):
    from library.optimizers import parse_key_values

    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    parsed = parse_key_values([f"weight_decay={code}", "betas=0.9,0.99", "eps=1e-8"])
    assert parsed == {"weight_decay": code, "betas": (0.9, 0.99), "eps": 1e-8}
    assert not marker.exists()
