"""Fetch one image URL into a folder: retries with backoff, size limit, decode check, atomic rename.

:class:`Downloader` is shared by worker threads; each thread gets its own ``requests.Session`` so
connections to the same host are reused. An attempt streams the body into a hidden temp file
(``.<stem>.tmp-<random>``) in the output folder, decodes it fully with Pillow (HTML error pages,
truncated bodies and other non-images are rejected) and only then renames it to its final name.
Whatever happens, no temp file is left behind.

Retried (with exponential backoff, or the server's ``Retry-After``): timeouts, connection errors,
bodies cut short, HTTP 408/425/429 and 5xx. Not retried: other HTTP codes (404 ...), non-images,
files over ``max_bytes``, redirects to anything but http/https, local write errors.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from library.download_plan import IMAGE_SUFFIXES, DownloadJob, is_fetchable

RETRYABLE_HTTP = (408, 425, 429)
_FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
_CHUNK = 256 * 1024
_MAX_DELAY = 60.0


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    max_bytes: int = 50_000_000
    verify_tls: bool = True
    max_redirects: int = 5
    user_agent: str = "sdxl-poster-downloader/1.0"


@dataclass(frozen=True)
class FetchResult:
    status: str
    file: str = ""
    bytes: int = 0
    width: int | None = None
    height: int | None = None
    attempts: int = 0
    detail: str = ""


class _Outcome(Exception):
    """How an attempt ended without a file; ``retry`` says whether trying again may help."""

    def __init__(self, status: str, detail: str = "", retry: bool = False, delay: float | None = None):
        super().__init__(status)
        self.status, self.detail, self.retry, self.delay = status, detail, retry, delay


def image_header(path: Path) -> tuple[int | None, int | None]:
    """(width, height) from the file header, or (None, None) if it is not a readable image."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception:
        return None, None


def decode_check(path: Path) -> tuple[str, int, int]:
    """Fully decode ``path``; return (format, width, height) or raise an :class:`_Outcome`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.format or "", image.size[0], image.size[1]
    except UnidentifiedImageError:
        raise _Outcome("not-an-image", "the bytes are not an image Pillow can read") from None
    except Image.DecompressionBombError as err:
        raise _Outcome("too-large", str(err)) from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for broken data
        raise _Outcome("truncated", f"image data is broken: {err}") from None


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _content_length(headers) -> int:
    try:
        return int(headers.get("Content-Length") or 0)
    except ValueError:
        return 0


def _discard(response) -> None:
    """Read a small error body so the connection can be reused; close big ones."""
    try:
        if _content_length(response.headers) <= 65536:
            response.content  # noqa: B018 - drains the body
    except Exception:
        pass
    response.close()


class Downloader:
    """Download :class:`DownloadJob` s into ``output_dir``; safe to call from many threads."""

    def __init__(self, output_dir: str | os.PathLike, options: FetchOptions):
        self.output_dir = Path(output_dir)
        self.options = options
        self._local = threading.local()
        self._sessions: list = []
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            session.headers["User-Agent"] = self.options.user_agent
            session.verify = self.options.verify_tls
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def existing_file(self, job: DownloadJob) -> Path | None:
        """The file a previous run saved for this job, if any."""
        suffixes = [job.suffix] if job.suffix else list(IMAGE_SUFFIXES)
        for suffix in suffixes:
            path = self.output_dir / (job.stem + suffix)
            if path.is_file():
                return path
        return None

    def download(self, job: DownloadJob) -> FetchResult:
        existing = self.existing_file(job)
        if existing is not None:
            width, height = image_header(existing)
            return FetchResult("skipped-existing", existing.name, existing.stat().st_size, width, height)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(job, attempt)
            except _Outcome as outcome:
                if not outcome.retry or attempt > self.options.retries or self.stop.is_set():
                    return FetchResult(outcome.status, attempts=attempt, detail=outcome.detail)
                self._sleep_before_retry(attempt, outcome.delay)

    def _sleep_before_retry(self, attempt: int, server_delay: float | None) -> None:
        if server_delay is not None:
            delay = min(server_delay, _MAX_DELAY)
        else:
            delay = min(self.options.backoff * 2 ** (attempt - 1), _MAX_DELAY) * random.uniform(0.75, 1.0)
        self.stop.wait(delay)

    def _get(self, url: str):
        """GET with redirects followed by hand, so each hop's scheme can be checked."""
        import requests

        timeout = self.options.timeout
        for _ in range(self.options.max_redirects + 1):
            try:
                response = self._session().get(url, stream=True, timeout=timeout, allow_redirects=False)
            except requests.exceptions.SSLError as err:
                raise _Outcome("tls-error", f"{err} (use --insecure only if you trust the host)") from None
            except requests.exceptions.Timeout:
                raise _Outcome("timeout", f"no answer within {timeout:g} s", retry=True) from None
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as err:
                raise _Outcome("bad-url", str(err)) from None
            except requests.exceptions.RequestException as err:
                raise _Outcome("connection-error", str(err), retry=True) from None
            if not response.is_redirect:
                return response
            target = urljoin(url, response.headers.get("Location", ""))
            _discard(response)
            if not is_fetchable(target):
                scheme = urlsplit(target).scheme or "(none)"
                raise _Outcome("bad-redirect", f"redirected to a {scheme} URL: {target[:200]}")
            url = target
        raise _Outcome("too-many-redirects", f"more than {self.options.max_redirects} redirects")

    def _attempt(self, job: DownloadJob, attempt: int) -> FetchResult:
        response = self._get(job.url)
        try:
            code = response.status_code
            if code != 200:
                retry = code in RETRYABLE_HTTP or code >= 500
                raise _Outcome(f"http-{code}", response.reason or "", retry, _retry_after(response.headers))
            length = _content_length(response.headers)
            if length > self.options.max_bytes:
                raise _Outcome("too-large", f"{length} bytes > --max_bytes {self.options.max_bytes}")
            return self._save(job, response, attempt)
        finally:
            _discard(response)

    def _save(self, job: DownloadJob, response, attempt: int) -> FetchResult:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{job.stem}.tmp-", dir=self.output_dir)
        except OSError as err:
            raise _Outcome("write-error", str(err)) from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                size = self._stream(response, handle)
                handle.flush()
                os.fsync(handle.fileno())
            image_format, width, height = decode_check(tmp)
            suffix = job.suffix or _FORMAT_SUFFIX.get(image_format, "." + image_format.lower())
            final = self.output_dir / (job.stem + suffix)
            os.replace(tmp, final)
            return FetchResult("ok", final.name, size, width, height, attempt)
        except OSError as err:  # disk full, a folder where the file should go, permissions
            raise _Outcome("write-error", str(err)) from None
        finally:
            if tmp.exists():
                tmp.unlink()

    def _stream(self, response, handle) -> int:
        import requests
        from urllib3.exceptions import ReadTimeoutError

        size = 0
        try:
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > self.options.max_bytes:
                    raise _Outcome("too-large", f"more than --max_bytes {self.options.max_bytes} bytes")
                if self.stop.is_set():
                    raise _Outcome("cancelled")
                handle.write(chunk)
        except requests.exceptions.Timeout:
            raise _Outcome("timeout", "the body stalled", retry=True) from None
        except requests.exceptions.RequestException as err:
            if err.args and isinstance(err.args[0], ReadTimeoutError):
                raise _Outcome("timeout", "the body stalled", retry=True) from None
            raise _Outcome("truncated", f"the connection broke mid-body: {err}", retry=True) from None
        return size
