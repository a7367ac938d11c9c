"""`residual serve`: a model behind HTTP, with the requests that arrive together run as one batch.

    POST /predict   an image's bytes as the body (curl --data-binary @cat.jpg), or a multipart form
                    with one or more files (curl -F image=@cat.jpg); ?topk=N -> JSON, each image's
                    top classes
    POST /explain   the same bodies; ?method=gradcam++&target=NAME&layer=layer3 -> JSON, each image's
                    Grad-CAM overlay as a PNG data URL (an <img src>) and the class it explains
    GET  /health    {"status": "ok"} while it serves
    GET  /info      the model: architecture, classes, input size, device, precision, batching
    GET  /metrics   requests, images, batches and time in Prometheus' text format

Each connection has a thread that reads and decodes its images (read_image's checks: bombs
refused, EXIF applied, every mode to RGB) and crops them as `residual predict` does. One batching
thread runs the model (`Batcher`): it takes every image waiting, up to `max_batch`, and while
other requests are still being read or decoded waits for them too, up to `max_wait_ms`; then it
answers them together. Under load a batch gathers while the one before it runs, so the model
sees full batches without any client sending them; a lone request waits for nothing.

The answers are `predict`'s: the same preprocessing, the same model path (`residual predict`'s
precision, torch.compile on request, or an exported .onnx in ONNX Runtime), so a served image
gets the probabilities `residual predict` prints for it.

Limits that keep a server up: a body over `max_image_mb` is refused before it is read (413);
beyond `max_pending` requests in flight new ones are turned away (503, Retry-After) instead of
queueing without bound; a connection idle for `timeout_s` is closed. A bad image is answered
with its reason (400), and the rest of a form is still predicted. It listens on 127.0.0.1 unless
told otherwise.

/explain runs `explain.grad_cam` in the request's own thread, one request at a time (the gradients' pass uses
every core the model's threads do), beside the batcher: the hooks it sets answer only to their own thread. It
needs the PyTorch model run eagerly: a server of an exported model, or one started with `compile` (a hook set on
the compiled model would make it compile again), answers it 501.

To expose it: `tls_cert`/`tls_key` serve HTTPS (the handshake runs in the connection's own thread, so a
slow or broken client holds up no one else), and `token` requires `Authorization: Bearer TOKEN` on every
endpoint but /health (load balancers probe it without credentials) and OPTIONS; a request without it, or
with another, gets 401. The token is compared in constant time.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import queue
import signal
import ssl
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import torch
from PIL import Image

from .data.decode import BadImageError, decode_bytes
from .data.transforms import normalize, resize_center_crop
from .errors import ConfigError, ResidualError
from .explain import explained_module, grad_cam, overlay, resolve_target
from .feature_bank import FeatureBank
from .predict import (check_min_confidence, check_tta, class_names_of, class_probabilities, inference_compile,
                      inference_forward, is_multi_label, is_unsure, model_device, present_classes,
                      probabilities_and_features, top_classes, tta_image_size)

MEGABYTE = 1 << 20
MIN_TOKEN_LENGTH = 16  # shorter is guessable; secrets.token_urlsafe() gives 43
ENDPOINTS = "POST /predict or /explain, GET /health, /info or /metrics"
ALLOWED_METHODS = {"/predict": "POST, OPTIONS", "/explain": "POST, OPTIONS", "/health": "GET, HEAD, OPTIONS",
                   "/info": "GET, HEAD, OPTIONS", "/metrics": "GET, HEAD, OPTIONS", "*": "GET, HEAD, POST, OPTIONS"}


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: int = 8000  # 0: any free port (ModelServer.port says which)
    max_batch: int = 32  # images in one run of the model
    max_wait_ms: float = 2.0  # how long the first image of a batch waits for others
    max_pending: int = 128  # requests in flight (reading, decoding, waiting) before new ones get 503
    max_image_mb: float = 16.0  # the largest request body taken
    topk: int = 5  # classes per image, unless a request asks ?topk=N
    min_confidence: float | None = None  # below it, an answer is "unsure": no class (predict's --min-confidence)
    feature_bank: str | None = None  # a feature_bank.safetensors: below its floor of similarity, "unsure" too
    tta: str = "none"
    compile: bool = False  # torch.compile, every batch padded to max_batch (one graph)
    timeout_s: float = 30.0  # a connection silent this long is closed
    access_log: bool = True  # a line per request on stderr
    tls_cert: str | None = None  # PEM certificate (chain) file: serve HTTPS; with tls_key
    tls_key: str | None = None  # PEM private key file of tls_cert
    token: str | None = None  # every endpoint but /health asks for "Authorization: Bearer <token>"

    def check(self) -> None:
        for name in ("max_batch", "max_pending", "topk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_image_mb", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be above 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give the certificate and its private key")
        if self.token is not None and (len(self.token) < MIN_TOKEN_LENGTH or self.token != self.token.strip()):
            raise ConfigError(f"--token-file: the token must be at least {MIN_TOKEN_LENGTH} characters with no "
                              f"leading or trailing spaces (python -c 'import secrets; print(secrets.token_urlsafe())' "
                              f"makes one)")
        check_tta(self.tta)
        check_min_confidence(self.min_confidence, multi_label=False)  # its range; the model's kind is checked later

    def tls_context(self) -> ssl.SSLContext | None:
        """The server's TLS context from tls_cert and tls_key; None without them."""
        if self.tls_cert is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except FileNotFoundError as error:
            raise ConfigError(f"--tls-cert/--tls-key: no such file {error.filename or ''}".rstrip()) from None
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f"--tls-cert {self.tls_cert} --tls-key {self.tls_key}: not a PEM certificate and its "
                              f"private key ({getattr(error, 'reason', None) or error})") from None
        return context


@dataclass
class Request:
    """A predict request in flight."""
    started: float  # time.perf_counter() at its arrival
    arrived: bool = False  # its images are with the batcher (or it will send none)


class ServerBusy(ResidualError):
    """The server takes no more work now (too many requests in flight, or it is stopping)."""


class Batcher:
    """One thread that runs the model on the images `submit` hands it, several at a time.

    It takes every image waiting, up to `max_batch`. While `arriving()` says more requests are on
    their way (read and decoded by their threads), it waits for them, up to `max_wait_s` after the
    batch's first image; with none on the way it runs at once, so a lone request waits for nothing.
    It sets each image's future to its class probabilities (a CPU tensor) and, with a `bank`, its
    similarity to the nearest training image (else None). A batch that fails sets the error on each of
    its futures; the thread carries on.
    """

    def __init__(self, forward, max_batch: int, max_wait_s: float, tta: str = "none", arriving=lambda: 0,
                 multi_label: bool = False, bank: FeatureBank | None = None):
        self.forward, self.max_batch, self.max_wait_s, self.tta = forward, max_batch, max_wait_s, tta
        self.multi_label, self.bank = multi_label, bank
        self.arriving = arriving
        self.batches = self.images = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="residual-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, images: list[torch.Tensor]) -> list[Future]:
        """A future per uint8 3 x H x W image; ServerBusy once `stop` has been called."""
        futures = [Future() for _ in images]
        with self._lock:
            if self._stopped:
                raise ServerBusy("the server is stopping")
            for image, future in zip(images, futures):
                self._queue.put((image, future))
        return futures

    def stop(self) -> None:
        """Answer what was submitted, then end the thread."""
        with self._lock:
            self._stopped = True
            self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while (batch := self._collect()) is not None:
            self._answer(batch)

    def _collect(self) -> list | None:
        """The next batch; None once `stop` was called and everything before it answered."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                wait = deadline - time.monotonic()
                if wait <= 0 or not self.arriving():
                    break
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    break
            if item is None:
                self._queue.put(None)  # answer this batch first, then stop
                break
            batch.append(item)
        return batch

    def _answer(self, batch: list) -> None:
        futures = [future for _, future in batch]
        images = torch.stack([image for image, _ in batch])
        try:
            if self.bank is None:
                probabilities = class_probabilities(self.forward, images, self.tta, self.multi_label)
                similarities = None
            else:
                probabilities, features = probabilities_and_features(self.forward, images, self.tta, self.multi_label)
                similarities = self.bank.similarity(features).cpu().tolist()
            probabilities = probabilities.cpu()
        except Exception as error:  # a server answers each request of a failed batch with 500, and lives on
            for future in futures:
                future.set_exception(error)
            return
        with self._lock:
            self.batches += 1
            self.images += len(batch)
        for future, row, similarity in zip(futures, probabilities, similarities or [None] * len(futures)):
            future.set_result((row, similarity))


class ModelServer:
    """`model` (a residual model or an OnnxModel, ready for inference) served over HTTP.

    `serve_forever()` blocks until SIGINT/SIGTERM (or `stop()` from another thread), then lets the
    requests in flight finish. `start()` serves from a background thread instead (tests, notebooks).
    """

    def __init__(self, model, config: ServeConfig | None = None, name: str = "model"):
        self.config = config or ServeConfig()
        self.config.check()
        self.model, self.name = model, name
        self.names = class_names_of(model)
        self.preprocessing = model.preprocessing
        # What each image is cut to: the model's input, or for ten-crop the resized square its crops come from.
        self.image_size = tta_image_size(self.preprocessing, self.config.tta)
        self.multi_label = is_multi_label(model)
        check_min_confidence(self.config.min_confidence, self.multi_label)
        self.bank = FeatureBank.load(self.config.feature_bank) if self.config.feature_bank else None
        if self.bank is not None:
            self.bank.check_model(model)
            if self.config.compile:
                raise ConfigError("--feature-bank reads the features of the model run eagerly; leave --compile out")
        if isinstance(model, torch.nn.Module):
            model.eval()
        compiled, _ = inference_compile(model, self.config.compile, 0)  # refuses --compile for an exported model
        forward = inference_forward(model, compiled, self.config.max_batch)
        self.batcher = Batcher(forward, self.config.max_batch, self.config.max_wait_ms / 1000, self.config.tta,
                               arriving=lambda: self.arriving, multi_label=self.multi_label, bank=self.bank)
        self.warmup_s = self._warm_up(forward)
        self.counts: dict[int, int] = {}
        self.request_seconds = 0.0
        self.in_flight = 0  # predict requests admitted and not yet answered (what --max-pending bounds)
        self.arriving = 0  # requests in flight whose images are not with the batcher yet
        self.unsent = 0  # admitted requests whose answer is not yet written (what a graceful stop waits for)
        self._lock = threading.Condition()
        self._explaining = threading.Lock()  # one /explain at a time
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        tls = self.config.tls_context()
        try:
            self.httpd = _HTTPServer((self.config.host, self.config.port), _handler_for(self))
        except OSError as error:
            raise ConfigError(f"--host {self.config.host} --port {self.config.port}: cannot listen there "
                              f"({error.strerror or error}); choose another --port, or 0 for any free one") from None
        self.port = self.httpd.server_address[1]
        if tls is not None:  # accept() hands over the connection; its thread does the handshake (_HTTPServer)
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
            self.httpd.handshake_timeout = self.config.timeout_s
        self.batcher.start()

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "") else "127.0.0.1"
        return f"{'https' if self.config.tls_cert else 'http'}://{host}:{self.port}"

    def _warm_up(self, forward) -> float:
        """Run a full batch once before listening, so the first requests do not pay for the backend's
        set-up (cuDNN's algorithm search, oneDNN's kernels, and with compile the compilation)."""
        started = time.perf_counter()
        size = self.image_size
        blank = torch.zeros(self.config.max_batch, 3, size, size, dtype=torch.uint8)
        class_probabilities(forward, blank, self.config.tta).cpu()
        return time.perf_counter() - started

    def describe(self) -> dict:
        """What GET /info answers."""
        model = self.model
        if isinstance(model, torch.nn.Module):
            runtime, precision = "pytorch", str(next(model.parameters()).dtype).removeprefix("torch.")
        else:  # an exported model: its file's precision, unless OpenVINO computes it in bf16
            runtime, precision = model.runtime, "bf16" if model.bf16 else model.precision
        return {"model": self.name, "arch": getattr(model, "arch", None), "classes": self.names,
                "multi_label": self.multi_label,
                **({"threshold": model.threshold} if self.multi_label else {}),
                "preprocessing": asdict(self.preprocessing),
                "runtime": runtime,
                "device": str(model_device(model)), "precision": precision,
                "explain": self.why_not_explain() is None,
                "serving": {**{key: value for key, value in asdict(self.config).items()
                               if key not in ("host", "port", "access_log", "tls_cert", "tls_key", "token")},
                            "tls": self.config.tls_cert is not None, "token": self.config.token is not None}}

    def metrics(self) -> str:
        """GET /metrics: Prometheus' text exposition format."""
        with self._lock:
            counts, seconds, in_flight = dict(self.counts), self.request_seconds, self.in_flight
        predicted = sum(counts.values())
        lines = ["# HELP residual_requests_total Predict and explain requests answered, by HTTP status.",
                 "# TYPE residual_requests_total counter"]
        lines += [f'residual_requests_total{{code="{code}"}} {count}' for code, count in sorted(counts.items())]
        lines += ["# HELP residual_request_seconds Time from a request's arrival to its answer.",
                  "# TYPE residual_request_seconds summary",
                  f"residual_request_seconds_sum {seconds:.6f}", f"residual_request_seconds_count {predicted}",
                  "# HELP residual_images_total Images the model has answered.",
                  "# TYPE residual_images_total counter", f"residual_images_total {self.batcher.images}",
                  "# HELP residual_batches_total Batches the model has run (images / batches: the mean batch).",
                  "# TYPE residual_batches_total counter", f"residual_batches_total {self.batcher.batches}",
                  "# HELP residual_requests_in_flight Predict requests being read, decoded or waiting for the model.",
                  "# TYPE residual_requests_in_flight gauge", f"residual_requests_in_flight {in_flight}"]
        return "\n".join(lines) + "\n"

    def admit(self) -> Request:
        """Count a predict request in, or ServerBusy when `max_pending` are in flight."""
        with self._lock:
            if self.in_flight >= self.config.max_pending:
                raise ServerBusy(f"busy: {self.in_flight} requests in flight (--max-pending); retry shortly")
            self.in_flight += 1
            self.arriving += 1
            self.unsent += 1
        return Request(time.perf_counter())

    def arrived(self, request: Request) -> None:
        """`request` has nothing more for the batcher (its images are submitted, or it failed first)."""
        with self._lock:
            if not request.arrived:
                request.arrived = True
                self.arriving -= 1

    def release(self, request: Request, status: int) -> None:
        """`request` has its answer: its place is free before the answer is written, so a client that sends
        its next request as soon as it reads this answer is not turned away for its own last one."""
        self.arrived(request)
        with self._lock:
            self.in_flight -= 1
            self.counts[status] = self.counts.get(status, 0) + 1
            self.request_seconds += time.perf_counter() - request.started

    def sent(self) -> None:
        """An admitted request's answer is written (or could not be)."""
        with self._lock:
            self.unsent -= 1
            self._lock.notify_all()

    def _crops(self, uploads: list[tuple[str, bytes]], size: int) -> tuple[list[dict], list[torch.Tensor], list[int]]:
        """Each upload decoded, resized and center-cropped to `size` as the model's preprocessing says: an answer
        per upload (its name; an error for one that is no image), the crops, and the answers they belong to."""
        pre = self.preprocessing
        answers: list[dict] = []
        crops, slots = [], []
        for name, data in uploads:
            try:
                image = decode_bytes(data, name, pre.resize_size)
                crops.append(resize_center_crop(image, pre.resize_size, size, pre.interpolation))
                slots.append(len(answers))
                answers.append({"image": name})
            except BadImageError as error:
                answers.append({"image": name, "error": str(error)})
        return answers, crops, slots

    def predict(self, uploads: list[tuple[str, bytes]], topk: int, request: Request) -> tuple[int, dict]:
        """(status, JSON body) for images given as (name, encoded bytes)."""
        answers, crops, slots = self._crops(uploads, self.image_size)
        futures = self.batcher.submit(crops) if crops else []
        self.arrived(request)
        for slot, future in zip(slots, futures):
            probabilities, similarity = future.result()
            answers[slot]["top"] = [{"class_id": index, "class": label, "probability": round(probability, 6)}
                                    for index, label, probability in top_classes(probabilities[None], self.names,
                                                                                 topk)[0]]
            if self.multi_label:  # every class present, whatever topk shows
                answers[slot]["labels"] = [label for _, label, _ in present_classes(
                    probabilities[None], self.names, self.model.threshold)[0]]
            if similarity is not None:
                answers[slot]["similarity"] = round(similarity, 6)
            unsure = is_unsure(float(probabilities.max()), similarity, self.config.min_confidence, self.bank)
            if unsure is not None:  # as predict: no class below a floor
                answers[slot]["unsure"] = unsure
        body = {"model": self.name, "predictions": answers}
        if not slots:
            return 400, {"error": answers[0]["error"] if len(answers) == 1 else
                         f"none of the {len(answers)} images could be read", **body}
        return 200, body

    def why_not_explain(self) -> str | None:
        """Why this server cannot answer /explain, or None where it can."""
        if not isinstance(self.model, torch.nn.Module):
            return (f"this server runs an exported model in {self.model.runtime}, which gives no gradients; serve "
                    f"the .safetensors model file to explain")
        if self.config.compile:
            return "this server runs the model under torch.compile; Grad-CAM runs it eagerly: serve without --compile"
        return None

    def explain(self, uploads: list[tuple[str, bytes]], method: str, target: str | None, layer: str | None,
                request: Request) -> tuple[int, dict]:
        """(status, JSON body): each image's Grad-CAM overlay as a PNG data URL, at the class the model predicts
        for it (a multi-label model's most probable) or `target`."""
        if (why := self.why_not_explain()) is not None:
            self.arrived(request)
            return 501, {"error": why}
        try:
            explained_module(self.model, method, layer)
            target_id = resolve_target(self.model, target)
        except ConfigError as error:
            self.arrived(request)
            return 400, {"error": str(error)}
        pre = self.preprocessing
        answers, crops, slots = self._crops(uploads, pre.input_size)
        self.arrived(request)
        body = {"model": self.name, "method": method, "explanations": answers}
        if not slots:
            return 400, {"error": answers[0]["error"] if len(answers) == 1 else
                         f"none of the {len(answers)} images could be read", **body}
        parameter = next(self.model.parameters())
        x = normalize(torch.stack(crops).to(parameter.device).float() / 255, pre).to(parameter.dtype)
        try:
            with self._explaining:
                heatmaps, probabilities = grad_cam(self.model, x, None if target_id is None else [target_id] * len(x),
                                                   layer, method)
        except ConfigError as error:  # a layer whose output is no feature map (fc), found as the model runs
            return 400, {"error": str(error)}
        for slot, crop, heatmap, row in zip(slots, crops, heatmaps, probabilities.float()):
            class_id = int(row.argmax()) if target_id is None else target_id
            picture = io.BytesIO()
            Image.fromarray(overlay(crop.permute(1, 2, 0).numpy(), heatmap.float().numpy())).save(picture, "PNG")
            answers[slot].update({"class_id": class_id, "class": self.names[class_id],
                                  "probability": round(float(row[class_id]), 6),
                                  "overlay": "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()})
        return 200, body

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM or `stop()`, then finish the requests in flight and close."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, self._on_signal)
        self._serving.set()
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self._close()

    def _on_signal(self, signum, frame) -> None:
        # shutdown() waits for serve_forever's loop, which runs in this (the main) thread: ask from another.
        threading.Thread(target=self.httpd.shutdown, daemon=True).start()

    def start(self) -> ModelServer:
        """Serve from a background thread; `stop()` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, name="residual-server", daemon=True)
        self._thread.start()
        self._serving.wait()
        return self

    def stop(self) -> None:
        """Stop serving (as SIGTERM does) and wait until it has; a server never started just closes."""
        if not self._serving.is_set():
            self._close()
            return
        self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join()

    def _close(self, grace_s: float = 30.0) -> None:
        """No new connections; the requests in flight get their answers (for up to `grace_s`); then stop."""
        with self._lock:
            self._lock.wait_for(lambda: self.unsent == 0, timeout=grace_s)
        self.batcher.stop()
        self.httpd.server_close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_uploads(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The images in a request body: the body itself, or each file of a multipart form (by its file name)."""
    if not content_type.lower().startswith("multipart/form-data"):
        return [("the request body", body)]
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    files = [(part.get_filename(), part.get_payload(decode=True) or b"")
             for part in (message.iter_parts() if message.is_multipart() else []) if part.get_filename()]
    if not files:
        raise ConfigError("the form has no file in it; send each image as a file field (curl -F image=@photo.jpg)")
    return files


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024  # connections waiting to be accepted: socketserver's 5 resets a burst of clients
    handshake_timeout: float | None = None  # set when serving TLS

    def finish_request(self, request, client_address) -> None:
        """In the connection's thread: the TLS handshake first (a client that fails it is logged and closed),
        then the request."""
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(self.handshake_timeout)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as error:
                sys.stderr.write(f"{client_address[0]} TLS handshake failed: {error}\n")
                return
        super().finish_request(request, client_address)


def _handler_for(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        app = server
        timeout = server.config.timeout_s
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's connection serves its next request
    # The headers and the body go out in two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK: about 50 ms a request to a 32 px model from one client, 9 ms with it off.
    disable_nagle_algorithm = True
    server_version, sys_version = "residual", ""  # the Server header names no Python version
    app: ModelServer

    def _authorized(self, route: str) -> bool:
        """Whether the request may go on: no token set, /health, or the token given; else it is refused
        with 401 here."""
        token = self.app.config.token
        if token is None or route == "/health":
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
        self._refuse_body(401, "this server needs its token: send the header \"Authorization: Bearer TOKEN\"",
                          {"WWW-Authenticate": 'Bearer realm="residual"'})
        return False

    def do_GET(self) -> None:
        route = urlsplit(self.path).path
        if not self._authorized(route):
            return
        if route == "/health":
            self._send(200, {"status": "ok"})
        elif route == "/info":
            self._send(200, self.app.describe())
        elif route == "/metrics":
            self._send_bytes(200, self.app.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif route in ("/predict", "/explain"):
            self._send(405, {"error": f"POST an image to {route} (curl --data-binary @photo.jpg URL{route})"},
                       {"Allow": ALLOWED_METHODS[route]})
        else:
            self._not_found(route)

    def do_HEAD(self) -> None:  # GET's status and headers without its body: how some uptime checks probe
        self.do_GET()

    def do_OPTIONS(self) -> None:
        route = urlsplit(self.path).path
        if route in ALLOWED_METHODS:
            self._send_bytes(204, b"", None, {"Allow": ALLOWED_METHODS[route]})
        else:
            self._not_found(route)

    def do_POST(self) -> None:
        route = urlsplit(self.path).path
        if not self._authorized(route):
            return
        if route not in ("/predict", "/explain"):
            self._not_found(route)
            return
        try:
            request = self.app.admit()
        except ServerBusy as error:
            self._refuse_body(503, str(error), {"Retry-After": "1"})
            return
        try:
            status = 500
            try:
                status, body, body_read = self._answer(request)
            finally:
                self.app.release(request, status)
            if body_read:
                self._send(status, body)
            else:
                self._refuse_body(status, body["error"], {"Retry-After": "1"} if status == 503 else None)
        finally:
            self.app.sent()

    def _answer(self, request: Request) -> tuple[int, dict, bool]:
        """(status, JSON body, whether the request's body was read) for this predict or explain request."""
        try:
            return *(self._explain(request) if urlsplit(self.path).path == "/explain" else self._predict(request)), True
        except _Refused as refusal:
            return refusal.status, {"error": str(refusal)}, False
        except ServerBusy as error:
            return 503, {"error": str(error)}, True
        except Exception as error:  # the model failed: this request gets 500, the server carries on
            self.log_error("%s failed: %r", urlsplit(self.path).path, error)
            return 500, {"error": f"the model failed on this request ({type(error).__name__}: {error})"}, True

    def _predict(self, request: Request) -> tuple[int, dict]:
        config = self.app.config
        try:
            topk = int(parse_qs(urlsplit(self.path).query).get("topk", [config.topk])[0])
        except ValueError:
            topk = 0
        if topk < 1:
            raise _Refused(400, "topk must be a whole number of 1 or more (/predict?topk=3)")
        try:
            uploads = self._uploads()
        except ConfigError as error:
            return 400, {"error": str(error)}
        return self.app.predict(uploads, topk, request)

    def _explain(self, request: Request) -> tuple[int, dict]:
        query = parse_qs(urlsplit(self.path).query)
        method = query.get("method", ["gradcam"])[0]
        target, layer = query.get("target", [None])[0], query.get("layer", [None])[0]
        try:
            uploads = self._uploads()
        except ConfigError as error:
            return 400, {"error": str(error)}
        return self.app.explain(uploads, method, target, layer, request)

    def _uploads(self) -> list[tuple[str, bytes]]:
        """The request's images, its body read whole; _Refused for a body that is not taken, ConfigError for a
        form without a file."""
        config = self.app.config
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers["Content-Length"] is None:
            raise _Refused(411, "send the body with a Content-Length (chunked uploads are not taken)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise _Refused(400, f"Content-Length {self.headers['Content-Length']!r} is not a number") from None
        if length > config.max_image_mb * MEGABYTE:
            raise _Refused(413, f"the body is {length / MEGABYTE:.1f} MB, over this server's limit of "
                                f"{config.max_image_mb:g} MB (--max-image-mb)")
        body = self.rfile.read(length)
        if len(body) < length:
            raise _Refused(400, f"the body ended after {len(body)} of its {length} bytes")
        return read_uploads(self.headers.get("Content-Type", ""), body)

    def _not_found(self, route: str) -> None:
        self._refuse_body(404, f"{route}: no such endpoint; {ENDPOINTS}")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The HTTP server's own refusals (a malformed request line, headers too long, a method such as PUT)
        as JSON like every other answer, instead of its HTML page."""
        message = (message or self.responses.get(code, ("error",))[0]) + (f" ({explain})" if explain else "")
        self.log_error("code %d, message %s", code, message)
        self._refuse_body(code, f"{message}; {ENDPOINTS}" if code == 501 else message)

    def _refuse_body(self, status: int, message: str, headers: dict | None = None) -> None:
        """An error answered without reading the request's body: the connection closes after it, as the
        unread body would otherwise be taken for the next request."""
        self.close_connection = True
        self._send(status, {"error": message}, {"Connection": "close", **(headers or {})})

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        self._send_bytes(status, json.dumps(body).encode(), "application/json", headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str | None, headers: dict | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != 204:
            self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code="-", size="-") -> None:
        if self.app.config.access_log:  # errors (log_error) are written either way
            super().log_request(code, size)

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"{self.log_date_time_string()} {self.address_string()} {format % args}\n")


class _Refused(Exception):
    """A request refused with `status` before its images were looked at."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def serve(model, config: ServeConfig | None = None, name: str = "model") -> None:
    """Serve `model` (loaded, ready for inference) over HTTP until SIGINT/SIGTERM: `residual serve`."""
    ModelServer(model, config, name).serve_forever()
