"""The explorer's web server: standard library ``http.server`` + JSON, one static page.

Routes (all answers are JSON except the page itself; errors are ``{"error": "..."}`` with a 4xx
status, never a stack trace, and the server keeps serving):

    GET  /                      the page (index.html, app.js, style.css: no external resources)
    GET  /api/info              pipeline summary: directions (estimator, index, scale), layers, classes
    GET  /api/gallery           the dataset images one can start from (PNG data URLs + labels)
    POST /api/source            {"dataset_index": i}         -> a source session (image, reconstruction)
    POST /api/upload[?invert=1] raw image bytes              -> a source session
    POST /api/edit              {"session": s, "strengths": {"<index>": value, ...} or [v0, v1, ...],
                                 "start": a, "end": b}       -> edited image + classifier prediction

Security (issue 9): binds to loopback by default; any other host is an explicit choice that logs
a warning. On loopback, requests whose ``Host`` header is not a loopback name are refused (a web
page elsewhere cannot reach the explorer through DNS rebinding). The page's Content-Security-
Policy allows only its own scripts.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import secrets
import socket
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import torch

from natra_ray.distributed.ray_init import is_loopback
from natra_ray.explorer.model import Explorer, RequestError, Source, decode_upload, png_bytes

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
         "/app.js": ("app.js", "text/javascript; charset=utf-8"), "/style.css": ("style.css", "text/css; charset=utf-8")}
MAX_JSON_BYTES = 64 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_SESSIONS = 64
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'"


def data_url(img: torch.Tensor) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


class Sessions:
    """The most recent ``MAX_SESSIONS`` inverted sources, by random token (LRU)."""

    def __init__(self, limit: int = MAX_SESSIONS):
        self.limit = limit
        self._d: "OrderedDict[str, Source]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, src: Source) -> str:
        token = secrets.token_hex(8)
        with self._lock:
            self._d[token] = src
            while len(self._d) > self.limit:
                self._d.popitem(last=False)
        return token

    def get(self, token: Any) -> Source:
        with self._lock:
            src = self._d.get(token) if isinstance(token, str) else None
            if src is None:
                raise RequestError("unknown or expired source session; pick the source image again", 404)
            self._d.move_to_end(token)
            return src


def _int_field(body: Dict[str, Any], key: str) -> int:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
        raise RequestError(f"field {key!r} must be an integer; got {v!r}")
    return int(v)


def parse_strengths(raw: Any, k: int) -> list[float]:
    """``{"<index>": value}`` (missing = 0) or a list of ``k`` values -> k floats."""
    if isinstance(raw, list):
        vals = raw
    elif isinstance(raw, dict):
        vals = [0.0] * k
        for key, v in raw.items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise RequestError(f"unknown direction {key!r}; directions are numbered 0..{k - 1}") from None
            if not 0 <= i < k:
                raise RequestError(f"unknown direction {i}; this pipeline has {k} directions (0..{k - 1})")
            vals[i] = v
    else:
        raise RequestError("field 'strengths' must be an object {\"<direction index>\": strength} or a list")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise RequestError(f"strengths must be finite numbers; got {v!r}")
    return [float(v) for v in vals]


class ExplorerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], explorer: Explorer,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.explorer = explorer
        self.sessions = Sessions()
        self.max_upload_bytes = int(max_upload_bytes)
        self.check_host = is_loopback(address[0])
        self._gallery_cache: Optional[Dict[str, Any]] = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    # ------------------------------------------------------------------ API
    def api_info(self, h: "Handler") -> Dict[str, Any]:
        return {**self.explorer.info(), "max_upload_bytes": self.max_upload_bytes}

    def api_gallery(self, h: "Handler") -> Dict[str, Any]:
        if self._gallery_cache is None:
            ex = self.explorer
            items = [{"index": i, "label": int(ex.gallery_labels[i]), "name": ex.class_names[int(ex.gallery_labels[i])]
                      if int(ex.gallery_labels[i]) < len(ex.class_names) else str(int(ex.gallery_labels[i])),
                      "png": data_url(ex.gallery_images[i])} for i in range(len(ex.gallery_images))]
            self._gallery_cache = {"items": items, "note": ex.gallery_note}
        return self._gallery_cache

    def _source_reply(self, src: Source) -> Dict[str, Any]:
        ex = self.explorer
        token = self.sessions.add(src)
        reply = {"session": token, "source": data_url(src.image), "recon": data_url(src.recon),
                 "pred_source": ex.predict(src.image).as_dict(), "pred_recon": ex.predict(src.recon).as_dict(),
                 "label": src.label, "label_name": None}
        if src.label is not None and src.label < len(ex.class_names):
            reply["label_name"] = ex.class_names[src.label]
        return reply

    def api_source(self, h: "Handler") -> Dict[str, Any]:
        body = h.read_json()
        i = _int_field(body, "dataset_index")
        x = self.explorer.gallery_item(i)
        return self._source_reply(self.explorer.encode(x, label=int(self.explorer.gallery_labels[i])))

    def api_upload(self, h: "Handler") -> Dict[str, Any]:
        data = h.read_body(self.max_upload_bytes, "upload")
        if not data:
            raise RequestError("the upload is empty; send the image file's bytes as the request body")
        invert = parse_qs(urlsplit(h.path).query).get("invert", ["0"])[0] in ("1", "true", "yes")
        ex = self.explorer
        x = decode_upload(data, ex.G.resolution, ex.G.img_channels,
                          pad_28_to_32=ex.cfg.data.dataset == "fashion_mnist", invert=invert)
        return self._source_reply(ex.encode(x))

    def api_edit(self, h: "Handler") -> Dict[str, Any]:
        body = h.read_json()
        ex = self.explorer
        src = self.sessions.get(body.get("session"))
        strengths = parse_strengths(body.get("strengths", {}), len(ex.dirs))
        start, end = _int_field(body, "start"), _int_field(body, "end")
        img = ex.edit(src, strengths, start, end)
        pred = ex.predict(img)
        base = ex.predict(src.recon)
        return {"image": data_url(img), "prediction": pred.as_dict(),
                "flipped": pred.label != base.label,  # vs the unedited reconstruction
                "escaped": src.label is not None and pred.label != src.label,  # vs the true label
                "change": float((img - src.recon).abs().mean())}

    def routes(self) -> Dict[Tuple[str, str], Callable[["Handler"], Dict[str, Any]]]:
        return {("GET", "/api/info"): self.api_info, ("GET", "/api/gallery"): self.api_gallery,
                ("POST", "/api/source"): self.api_source, ("POST", "/api/upload"): self.api_upload,
                ("POST", "/api/edit"): self.api_edit}


class Handler(BaseHTTPRequestHandler):
    server: ExplorerServer
    server_version = "natra-explorer"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ I/O
    def _send(self, status: int, body: bytes, ctype: str, extra: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, payload: Dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message, "status": status})

    def read_body(self, limit: int, what: str) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise RequestError(f"the {what} needs a Content-Length header (chunked uploads are not accepted)", 411)
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(f"bad Content-Length {length!r}") from None
        if n < 0:
            self.close_connection = True
            raise RequestError(f"bad Content-Length {length!r}")
        if n > limit:
            self._discard(n)
            raise RequestError(f"the {what} is {n} bytes; the limit is {limit} bytes "
                               f"({limit / 2**20:.1f} MiB): send a smaller file", 413)
        return self.rfile.read(n)

    def _discard(self, n: int) -> None:
        """Drop an oversized body so the client can read our answer; very large ones end the
        connection instead of being read."""
        self.close_connection = True
        if n <= 4 * max(self.server.max_upload_bytes, MAX_JSON_BYTES):
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)

    def read_json(self) -> Dict[str, Any]:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        raw = self.read_body(MAX_JSON_BYTES, "JSON body")
        if ctype != "application/json":
            raise RequestError(f"send JSON with Content-Type: application/json (got {ctype or 'none'!r})", 415)
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    # ------------------------------------------------------------------ dispatch
    def _host_ok(self) -> bool:
        if not self.server.check_host:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
        return name.lower() in LOOPBACK_NAMES

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        try:
            if not self._host_ok():
                raise RequestError("this explorer only answers requests addressed to localhost", 403)
            if method == "GET" and path in PAGES:
                name, ctype = PAGES[path]
                return self._send(200, (STATIC / name).read_bytes(), ctype)
            routes = self.server.routes()
            fn = routes.get((method, path))
            if fn is None:
                allowed = [m for (m, p) in routes if p == path]
                if allowed:
                    if method == "POST":
                        self._discard(int(self.headers.get("Content-Length") or 0))
                    raise RequestError(f"{method} is not allowed on {path}; use {', '.join(allowed)}", 405)
                raise RequestError(f"no such page or API: {path}", 404)
            self.send_json(200, fn(self))
        except RequestError as e:
            self.send_error_json(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - one line to the client, the trace to the server log
            log.exception("explorer: %s %s failed", method, path)
            self.close_connection = True
            try:
                self.send_error_json(500, f"internal error ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                                          f"see the server log")
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 8765,
                max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> ExplorerServer:
    """Bind (``port=0``: any free port); a non-loopback ``host`` logs a warning (issue 9)."""
    if not is_loopback(host):
        log.warning("the explorer listens on %s: anyone who can reach port %d there can use it (there is no "
                    "login); prefer the default 127.0.0.1 with `ssh -L %d:127.0.0.1:%d <host>`",
                    host, port, port or 8765, port or 8765)
    return ExplorerServer((host, port), explorer, max_upload_bytes)
