"""Where a request's images may come from (`points serve`'s policy): data URLs, bounded in bytes and pixels
before decoding; `http(s)://` only when allowed (size and time bounded, private addresses refused); local
files only inside one folder. A refusal is an ApiError naming the field (points.tooling.protocol).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from pathlib import Path

from points.tooling.protocol import ApiError, invalid

MIB = 1 << 20
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.*)", re.S)


class Images:
    """Where an image part's URL may come from, and its limits."""

    def __init__(self, max_bytes: int, remote: bool = False, local_dir: str | Path | None = None,
                 timeout_s: float = 10.0):
        self.max_bytes, self.remote, self.timeout_s = max_bytes, remote, timeout_s
        self.local_dir = Path(local_dir).resolve() if local_dir is not None else None

    def read(self, url, param: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise invalid(param, "expected a non-empty string (a data:image/...;base64 URL)")
        match = DATA_URL.fullmatch(url)
        if match is not None:
            data = "".join(match.group(1).split())
            if len(data) * 3 // 4 > self.max_bytes:
                raise ApiError(413, f"{param}: the image is over the limit of {self.max_bytes // MIB} MiB", param,
                               code="image_too_large")
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise invalid(param, "the data URL's base64 payload is not valid base64") from None
        if url.startswith("data:"):
            raise invalid(param, "a data URL must be data:image/<type>;base64,<payload>")
        if url.startswith(("http://", "https://")):
            if not self.remote:
                raise invalid(param, "remote image URLs are refused (start the server with --allow-remote-images); "
                                     "send the image as a data:image/...;base64 URL")
            return self._fetch(url, param)
        if self.local_dir is None:
            raise invalid(param, "local image paths are refused (start the server with --allow-local-images DIR); "
                                 "send the image as a data:image/...;base64 URL")
        path = Path(url.removeprefix("file://"))
        path = (path if path.is_absolute() else self.local_dir / path).resolve()
        if not path.is_relative_to(self.local_dir):
            raise invalid(param, f"local images must lie inside {self.local_dir}")
        try:
            if path.stat().st_size > self.max_bytes:
                raise ApiError(413, f"{param}: the image is over the limit of {self.max_bytes // MIB} MiB", param,
                               code="image_too_large")
            return path.read_bytes()
        except OSError as e:
            raise invalid(param, f"cannot read the image ({e.strerror or e})") from None

    def _fetch(self, url: str, param: str) -> bytes:
        import urllib.error
        import urllib.request

        import http.client

        deadline, data = time.monotonic() + self.timeout_s, bytearray()
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                while len(data) <= self.max_bytes:  # the whole download within the time limit, not each read
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not complete within {self.timeout_s:g} s")
                    chunk = response.read(min(65536, self.max_bytes + 1 - len(data)))
                    if not chunk:
                        break
                    data += chunk
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            raise invalid(param, f"the image could not be fetched ({getattr(e, 'reason', e)})") from None
        if len(data) > self.max_bytes:
            raise ApiError(413, f"{param}: the image is over the limit of {self.max_bytes // MIB} MiB", param,
                           code="image_too_large")
        return data
