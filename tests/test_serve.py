"""`residual serve`: predict's answers over HTTP, requests batched together, bad requests refused in one line."""

import base64
import copy
import dataclasses
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import residual
from residual.cli import main
from residual.data import decode
from residual.errors import ConfigError, ResidualError
from residual.explain import overlay
from residual.feature_bank import FeatureBank
from residual.predict import class_probabilities
from residual.serve import Batcher, ModelServer, ServeConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = residual.create_model("resnet20", num_classes=3).eval()
    model.class_names = ["circle", "square", "star"]
    return model


@pytest.fixture(scope="module")
def pictures():
    """Encoded images of several sizes and formats (bytes by name)."""
    generator = np.random.default_rng(0)
    encoded = {}
    for name, size, fmt in (("a.png", (32, 32), "PNG"), ("b.jpg", (60, 45), "JPEG"), ("c.png", (20, 50), "PNG")):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, fmt)
        encoded[name] = buffer.getvalue()
    return encoded


def serve(model, **options) -> ModelServer:
    return ModelServer(model, ServeConfig(port=0, access_log=False, **options), name="tiny")


def request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a request, error statuses included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {})) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def form(files: dict[str, bytes]) -> tuple[bytes, dict]:
    """A multipart/form-data body with each file in a field of its own, as curl -F sends it."""
    boundary = "residual-test-boundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="image{i}"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for i, (name, data) in enumerate(files.items()))
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def expected(model, data: bytes) -> torch.Tensor:
    """The probabilities `residual predict` gives the image."""
    return torch.tensor([p for _, _, p in sorted(residual.predict(model, Image.open(io.BytesIO(data)),
                                                                  topk=3).predictions[0].top)])


def test_served_probabilities_are_predicts(model, pictures):
    with serve(model) as server:
        for name, data in pictures.items():
            status, body, _ = request(f"{server.url}/predict", data)
            assert status == 200 and body["model"] == "tiny"
            (answer,) = body["predictions"]
            assert answer["image"] == "the request body" and len(answer["top"]) == 3  # topk 5 of 3 classes
            got = torch.tensor([row["probability"] for row in sorted(answer["top"], key=lambda r: r["class_id"])])
            torch.testing.assert_close(got, expected(model, data), atol=2e-6, rtol=0)
            assert [row["class"] for row in answer["top"]][0] == model.class_names[int(expected(model, data).argmax())]
        status, body, _ = request(f"{server.url}/predict?topk=1", pictures["a.png"])
        assert status == 200 and len(body["predictions"][0]["top"]) == 1


def test_ten_crop_serving_answers_as_predict_does(model, pictures):
    wider = copy.deepcopy(model)
    wider.preprocessing = dataclasses.replace(model.preprocessing, resize_size=40)
    with serve(wider, tta="ten-crop", max_batch=2) as server:
        for data in pictures.values():
            status, body, _ = request(f"{server.url}/predict", data)
            assert status == 200
            got = torch.tensor([row["probability"] for row in sorted(body["predictions"][0]["top"],
                                                                     key=lambda r: r["class_id"])])
            predicted = residual.predict(wider, Image.open(io.BytesIO(data)), topk=3, tta="ten-crop")
            want = torch.tensor([p for _, _, p in sorted(predicted.predictions[0].top)])
            torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
            assert not torch.allclose(got, expected(wider, data), atol=1e-4)
    with pytest.raises(ConfigError, match="--tta ten-crop cuts 32 px crops"):
        serve(model, tta="ten-crop")


def test_a_confidence_floor_marks_the_answers_predict_marks_unsure(model, pictures):
    tops = {name: residual.predict(model, Image.open(io.BytesIO(data))).predictions[0].top[0][2]
            for name, data in pictures.items()}
    floor = float(np.median(list(tops.values())))  # some images above it, some below
    with serve(model, min_confidence=floor) as server:
        for name, data in pictures.items():
            status, body, _ = request(f"{server.url}/predict", data)
            [answer] = body["predictions"]
            unsure = residual.predict(model, Image.open(io.BytesIO(data)), min_confidence=floor).predictions[0].unsure
            assert status == 200 and answer["unsure"] is unsure is (tops[name] < floor)
        assert request(f"{server.url}/info")[1]["serving"]["min_confidence"] == floor
    assert {True, False} <= {tops[name] < floor for name in tops}
    with serve(model) as server:  # without a floor, no "unsure" key
        assert "unsure" not in request(f"{server.url}/predict", pictures["a.png"])[1]["predictions"][0]
    with pytest.raises(ConfigError, match="--min-confidence is a probability"):
        serve(model, min_confidence=1.5)
    tagger = copy.deepcopy(model)
    tagger.multi_label = True
    with pytest.raises(ConfigError, match="--min-confidence: a multi-label model answers"):
        serve(tagger, min_confidence=0.5)


def test_a_feature_bank_gives_each_answer_predicts_similarity_and_its_floor(model, pictures, tmp_path):
    torch.manual_seed(1)
    path = FeatureBank.of(torch.randn(20, 64).relu(), 1, 0.0, model).save(tmp_path / "feature_bank.safetensors")
    bank = FeatureBank.load(path)
    similar = {name: residual.predict(model, Image.open(io.BytesIO(data)), feature_bank=bank).predictions[0]
               .similarity for name, data in pictures.items()}
    bank.floor = float(np.median(list(similar.values())))
    bank.save(path)
    with serve(model, feature_bank=str(path)) as server:
        for name, data in pictures.items():
            status, body, _ = request(f"{server.url}/predict", data)
            [answer] = body["predictions"]
            assert status == 200 and answer["similarity"] == pytest.approx(similar[name], abs=1e-5)
            assert answer["unsure"] is (similar[name] < bank.floor)
    assert {True, False} <= {similar[name] < bank.floor for name in similar}
    other = residual.create_model("resnet20", num_classes=3)  # same shapes, other weights
    with pytest.raises(ResidualError, match="made with another model"):
        serve(other, feature_bank=str(path))
    with pytest.raises(ResidualError, match="leave --compile out"):
        serve(model, feature_bank=str(path), compile=True)


def test_a_form_of_several_files_answers_each_and_names_the_bad_one(model, pictures):
    with serve(model) as server:
        body, headers = form({"a.png": pictures["a.png"], "notes.jpg": b"not an image", "b.jpg": pictures["b.jpg"]})
        status, answer, _ = request(f"{server.url}/predict?topk=2", body, headers)
        assert status == 200
        assert [p["image"] for p in answer["predictions"]] == ["a.png", "notes.jpg", "b.jpg"]
        assert answer["predictions"][1] == {"image": "notes.jpg", "error": "notes.jpg: not an image Pillow can read"}
        assert all(len(answer["predictions"][i]["top"]) == 2 for i in (0, 2))
        body, headers = form({"x.png": b"", "y.png": b"\x89PNG"})
        status, answer, _ = request(f"{server.url}/predict", body, headers)
        assert status == 400 and answer["error"] == "none of the 2 images could be read"


def test_bad_requests_get_a_one_line_reason_and_the_server_carries_on(model, pictures, monkeypatch):
    with serve(model, max_image_mb=0.01) as server:
        url = f"{server.url}/predict"
        checks = [
            (request(url, b"junk"), 400, "the request body: not an image Pillow can read"),
            (request(url, b""), 400, "the request body: empty (0 bytes)"),
            (request(url, bytes(20000)), 413, "the body is 0.0 MB, over this server's limit of 0.01 MB "
                                             "(--max-image-mb)"),
            (request(f"{url}?topk=0", pictures["a.png"]), 400, "topk must be a whole number of 1 or more"),
            (request(f"{url}?topk=two", pictures["a.png"]), 400, "topk must be a whole number of 1 or more"),
            (request(url, *form({})), 400, "the form has no file in it"),
            (request(url), 405, "POST an image to /predict"),
            (request(f"{server.url}/explain"), 405, "POST an image to /explain"),
            (request(f"{server.url}/explain", bytes(20000)), 413, "the body is 0.0 MB, over this server's limit"),
            (request(f"{server.url}/explain", b"junk"), 400, "the request body: not an image Pillow can read"),
            (request(f"{server.url}/nope"), 404, "/nope: no such endpoint"),
            (request(f"{server.url}/health", b"x"), 404, "/health: no such endpoint"),
        ]
        for (status, body, _), want_status, want_message in checks:
            assert status == want_status and body["error"].startswith(want_message), body
            assert "\n" not in body["error"]
        assert request(url)[2]["Allow"] == "POST, OPTIONS"
        connection = http.client.HTTPConnection("127.0.0.1", server.port)
        connection.putrequest("POST", "/predict")
        connection.endheaders()  # no Content-Length, no body
        response = connection.getresponse()
        assert response.status == 411 and b"Content-Length" in response.read()
        monkeypatch.setattr(decode, "MAX_PIXELS", 100)
        status, body, _ = request(url, pictures["a.png"])
        assert status == 400 and "possible decompression bomb" in body["error"]
        assert request(f"{server.url}/health")[:2] == (200, {"status": "ok"})
        metrics = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
        assert 'residual_requests_total{code="400"} 7' in metrics and 'residual_requests_total{code="413"} 2' in metrics
        assert 'residual_requests_total{code="411"} 1' in metrics and "residual_images_total 0" in metrics


def test_head_options_and_the_http_servers_own_refusals_answer_in_json(model):
    with serve(model) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port)

        def ask(method: str, path: str) -> tuple[http.client.HTTPResponse, bytes]:
            connection.request(method, path)
            response = connection.getresponse()
            return response, response.read()

        # HEAD: GET's headers without a body, and the connection serves the next request.
        head, body = ask("HEAD", "/health")
        assert head.status == 200 and body == b"" and head.headers["Content-Length"] == "16"
        get, body = ask("GET", "/health")
        assert get.status == 200 and json.loads(body) == {"status": "ok"}
        options, body = ask("OPTIONS", "/predict")
        assert options.status == 204 and options.headers["Allow"] == "POST, OPTIONS" and body == b""
        options, _ = ask("OPTIONS", "/metrics")
        assert options.headers["Allow"] == "GET, HEAD, OPTIONS"
        assert ask("OPTIONS", "/nope")[0].status == 404
        connection.close()
        for method in ("PUT", "DELETE"):
            connection = http.client.HTTPConnection("127.0.0.1", server.port)
            connection.request(method, "/predict")
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 501 and response.headers["Content-Type"] == "application/json"
            assert answer["error"] == (f"Unsupported method ('{method}'); POST /predict or /explain, GET /health, "
                                       f"/info or /metrics")
            connection.close()
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nX-Long: " + b"x" * 70000 + b"\r\n\r\n")
            reply = raw.makefile("rb").read()
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431") and b"Content-Type: application/json" in head
        assert json.loads(body) == {"error": "Line too long (got more than 65536 bytes when reading header line)"}
        with socket.create_connection(("127.0.0.1", server.port)) as raw:  # no HTTP version: a bare answer
            raw.sendall(b"HELLO\r\n\r\n")
            assert json.loads(raw.makefile("rb").read()) == {"error": "Bad request syntax ('HELLO')"}
        assert request(f"{server.url}/health")[:2] == (200, {"status": "ok"})


class CountingForward:
    """The model, counting the batches it is given; `gate` (when set) holds each batch until it opens."""

    def __init__(self, model, gate: threading.Event | None = None):
        self.model, self.gate, self.sizes = model, gate, []
        self.preprocessing = model.preprocessing

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x):
        self.sizes.append(len(x))
        if self.gate is not None:
            assert self.gate.wait(30)
        return self.model(x)


class OutOfMemory(CountingForward):
    def __call__(self, x):
        raise RuntimeError("CUDA out of memory")


@pytest.mark.parametrize("max_batch, sizes", [(8, [5]), (2, [2, 2, 1])])
def test_waiting_images_run_as_one_batch_up_to_max_batch(model, max_batch, sizes):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    forward = CountingForward(model)
    batcher = Batcher(forward, max_batch, max_wait_s=0.0)
    futures = batcher.submit(list(images))  # all waiting before the thread starts
    batcher.start()
    got = torch.stack([future.result(timeout=30)[0] for future in futures])
    assert all(future.result()[1] is None for future in futures)  # no feature bank, no similarity
    batcher.stop()
    assert forward.sizes == sizes and (batcher.batches, batcher.images) == (len(sizes), 5)
    torch.testing.assert_close(got, class_probabilities(model, images), atol=1e-6, rtol=0)
    with pytest.raises(residual.ResidualError, match="the server is stopping"):
        batcher.submit(list(images))


def test_the_batcher_waits_only_while_more_images_are_on_their_way(model):
    images = list(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    on_the_way = [1]
    forward = CountingForward(model)
    batcher = Batcher(forward, 8, max_wait_s=30.0, arriving=lambda: on_the_way[0])
    batcher.start()
    first = batcher.submit(images[:1])
    threading.Event().wait(0.2)
    assert not first[0].done()  # one more request is being decoded: it waits for it
    on_the_way[0] = 0  # the second request's images are submitted next
    second = batcher.submit(images[1:])
    assert first[0].result(timeout=30) is not None and second[0].result(timeout=30) is not None
    assert forward.sizes == [2]
    started = time.monotonic()
    batcher.submit(images[:1])[0].result(timeout=30)  # nothing on the way: no wait for the 30 s
    assert forward.sizes == [2, 1] and time.monotonic() - started < 10
    batcher.stop()


def test_requests_that_arrive_together_share_a_batch(model, pictures):
    with serve(model, max_wait_ms=1000, max_batch=8) as server:
        start = threading.Barrier(8)
        statuses = []

        def client():
            start.wait()
            statuses.append(request(f"{server.url}/predict", pictures["a.png"])[0])

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 8
        assert server.batcher.images == 8 and server.batcher.batches < 8


def held_request(server: ModelServer, model, data: bytes) -> tuple[threading.Event, threading.Thread, list]:
    """A request sent from a thread and held inside the model until the returned gate opens: (gate, the
    thread, the list its answer goes to)."""
    gate, answers = threading.Event(), []
    server.batcher.forward = CountingForward(model, gate)
    client = threading.Thread(target=lambda: answers.append(request(f"{server.url}/predict", data)))
    client.start()
    while server.in_flight == 0:
        threading.Event().wait(0.01)
    return gate, client, answers


def test_a_full_server_turns_requests_away_and_a_failed_batch_is_a_500(model, pictures):
    with serve(model, max_pending=1) as server:
        gate, holder, first = held_request(server, model, pictures["a.png"])
        status, body, headers = request(f"{server.url}/predict", pictures["a.png"])
        assert status == 503 and headers["Retry-After"] == "1"
        assert body["error"] == "busy: 1 requests in flight (--max-pending); retry shortly"
        gate.set()
        holder.join()
        assert first[0][0] == 200

        server.batcher.forward = OutOfMemory(model)
        status, body, _ = request(f"{server.url}/predict", pictures["a.png"])
        assert status == 500 and body["error"] == "the model failed on this request (RuntimeError: CUDA out of memory)"
        server.batcher.forward = model
        # One request at a time, each sent as soon as the last answer is read: never turned away for the last
        # (the place used to be freed after the answer was written, and a quick client could get a 503).
        assert [request(f"{server.url}/predict", pictures["a.png"])[0] for _ in range(30)] == [200] * 30


def test_stopping_answers_the_requests_in_flight_first(model, pictures):
    server = serve(model).start()
    gate, client, answers = held_request(server, model, pictures["a.png"])
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    threading.Event().wait(0.3)
    assert stopper.is_alive()  # waiting for the request in flight
    gate.set()
    stopper.join(30)
    client.join(30)
    assert answers[0][0] == 200 and not stopper.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{server.url}/health", timeout=5)
    never_started = serve(model)
    never_started.stop()  # closes at once (shutting down a loop that never ran would wait for ever)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{never_started.url}/health", timeout=5)


def test_an_exported_onnx_model_is_served_with_the_same_answers(model, pictures, tmp_path):
    from residual.deploy.onnx import OnnxModel, write_onnx

    write_onnx(model, tmp_path / "tiny.onnx")
    for runtime in ("onnxruntime", "openvino"):
        with ModelServer(OnnxModel(tmp_path / "tiny.onnx", runtime=runtime),
                         ServeConfig(port=0, access_log=False)) as server:
            status, body, _ = request(f"{server.url}/predict", pictures["b.jpg"])
            info = request(f"{server.url}/info")[1]
            refused = request(f"{server.url}/explain", pictures["b.jpg"])
        assert refused[0] == 501 and "gives no gradients; serve the .safetensors model" in refused[1]["error"]
        assert info["explain"] is False
        got = torch.tensor([row["probability"] for row in sorted(body["predictions"][0]["top"],
                                                                 key=lambda r: r["class_id"])])
        torch.testing.assert_close(got, expected(model, pictures["b.jpg"]), atol=1e-4, rtol=0)
        assert info["runtime"] == runtime and info["classes"] == model.class_names and info["precision"] == "fp32"


def test_info_describes_the_model_and_the_serving(model):
    with serve(model, max_batch=4, topk=2) as server:
        info = request(f"{server.url}/info")[1]
    assert info["arch"] == "resnet20" and info["classes"] == ["circle", "square", "star"]
    assert info["preprocessing"]["input_size"] == 32 and info["device"] == "cpu" and info["precision"] == "float32"
    assert info["serving"]["max_batch"] == 4 and info["serving"]["topk"] == 2 and info["runtime"] == "pytorch"


def overlay_of(answer: dict) -> np.ndarray:
    """The picture an /explain answer's data URL holds."""
    prefix = "data:image/png;base64,"
    assert answer["overlay"].startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["overlay"][len(prefix):]))))


def test_explain_answers_each_image_with_the_overlay_explain_draws_it(model, pictures):
    body, headers = form({"a.png": pictures["a.png"], "bad.png": b"not an image", "c.png": pictures["c.png"]})
    with serve(model) as server:
        status, one, _ = request(f"{server.url}/explain", pictures["b.jpg"])
        several = request(f"{server.url}/explain?method=layercam&layer=layer2&target=star", body, headers)
        refusals = [request(f"{server.url}/explain?{query}", pictures["a.png"]) for query in
                    ("method=nope", "target=dog", "layer=nowhere", "layer=fc")]
        assert server.describe()["explain"] is True

    assert status == 200 and one["method"] == "gradcam" and one["model"] == "tiny"
    [answer] = one["explanations"]
    [cam] = residual.explain(model, Image.open(io.BytesIO(pictures["b.jpg"]))).explanations
    assert (answer["class"], answer["class_id"]) == (cam.class_name, cam.class_id)
    assert answer["probability"] == pytest.approx(cam.probability, abs=1e-6)
    drawn = overlay_of(answer).astype(int)
    # Within a neighbouring jet colour: the heatmaps agree to float rounding, which may tip a value over a step.
    assert drawn.shape == (224, 224, 3) and np.abs(drawn - overlay(cam.image, cam.heatmap)).max() <= 3

    assert several[0] == 200 and several[1]["method"] == "layercam"
    answers = several[1]["explanations"]
    assert [a["image"] for a in answers] == ["a.png", "bad.png", "c.png"] and "error" in answers[1]
    for answer, name in ((answers[0], "a.png"), (answers[2], "c.png")):
        [cam] = residual.explain(model, Image.open(io.BytesIO(pictures[name])), method="layercam", layer="layer2",
                                 target="star").explanations
        assert answer["class"] == "star" and np.abs(overlay_of(answer).astype(int)
                                                    - overlay(cam.image, cam.heatmap)).max() <= 3
    messages = ["--method must be one of", "--target 'dog': not a class", "--layer 'nowhere': no such module",
                "--layer 'fc': its output is not a feature map"]
    for (status, answer, _), message in zip(refusals, messages):
        assert status == 400 and message in answer["error"]


def test_predictions_made_while_explaining_are_predicts(model, pictures):
    """Grad-CAM's hooks on the shared model answer only to their own thread: the batcher's answers are unchanged."""
    with serve(model, max_wait_ms=5) as server:
        def explain_often():
            for _ in range(6):
                assert request(f"{server.url}/explain", pictures["b.jpg"])[0] == 200
        explaining = threading.Thread(target=explain_often)
        explaining.start()
        answers = [request(f"{server.url}/predict", pictures[name])[1]["predictions"][0]
                   for _ in range(3) for name in pictures]
        explaining.join()
    for answer, name in zip(answers, list(pictures) * 3):
        got = torch.tensor([row["probability"] for row in sorted(answer["top"], key=lambda row: row["class_id"])])
        torch.testing.assert_close(got, expected(model, pictures[name]), atol=1e-5, rtol=0)


TOKEN = "a-test-token-of-enough-length"


def test_with_a_token_every_endpoint_but_health_asks_for_it(model, pictures):
    with serve(model, token=TOKEN) as server:
        for route, body in (("/predict", pictures["a.png"]), ("/info", None), ("/metrics", None)):
            for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"},
                            {"Authorization": f"Basic {TOKEN}"}):
                status, answer, sent = request(f"{server.url}{route}", body, headers)
                assert status == 401 and "Authorization: Bearer TOKEN" in answer["error"]
                assert sent["WWW-Authenticate"] == 'Bearer realm="residual"'
        assert request(f"{server.url}/health")[0] == 200  # load balancers probe it without credentials
        status, answer, _ = request(f"{server.url}/predict", pictures["a.png"], {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and len(answer["predictions"]) == 1
        info = request(f"{server.url}/info", headers={"Authorization": f"bearer {TOKEN}"})[1]
        assert info["serving"]["token"] is True and TOKEN not in json.dumps(info)  # never answered back
    with pytest.raises(residual.ConfigError, match="the token must be at least 16 characters"):
        serve(model, token="short")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate, and it is not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(folder / "key.pem"),
                    "-out", str(folder / "cert.pem")], check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


def test_with_a_certificate_it_serves_https_and_a_failed_handshake_stops_no_one(model, pictures, certificate):
    cert, key = certificate
    client = ssl.create_default_context(cafile=str(cert))
    with serve(model, tls_cert=str(cert), tls_key=str(key), token=TOKEN) as server:
        assert server.url.startswith("https://127.0.0.1:")
        stalled = socket.create_connection(("127.0.0.1", server.port))  # connects, never says hello
        plain = socket.create_connection(("127.0.0.1", server.port))
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # HTTP where TLS is expected
        assert b"200" not in plain.recv(1024)
        plain.close()
        answer = urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/predict", data=pictures["b.jpg"], headers={"Authorization": f"Bearer {TOKEN}"}),
            context=client)
        assert answer.status == 200 and len(json.loads(answer.read())["predictions"]) == 1
        stalled.close()
    with pytest.raises(residual.ConfigError, match="^--tls-cert and --tls-key go together"):
        serve(model, tls_cert=str(cert))
    with pytest.raises(residual.ConfigError, match=f"^--tls-cert {cert} --tls-key {cert}: not a PEM certificate"):
        serve(model, tls_cert=str(cert), tls_key=str(cert))


def test_the_command_takes_its_token_from_a_file_or_the_environment(model, tmp_path, capsys, monkeypatch):
    from residual.cli import _serve_token
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    assert _serve_token(str(tmp_path / "token")) == TOKEN
    monkeypatch.setenv("RESIDUAL_SERVE_TOKEN", "from-the-environment-1234")
    assert _serve_token(None) == "from-the-environment-1234"
    monkeypatch.delenv("RESIDUAL_SERVE_TOKEN")
    assert _serve_token(None) is None
    path = tmp_path / "tiny.safetensors"
    residual.save_model(model, path)
    (tmp_path / "empty").write_text("\n")
    for argv, message in (([str(path), "--token-file", str(tmp_path / "empty")], "its first line is empty"),
                          ([str(path), "--token-file", str(tmp_path / "none")], "cannot read it"),
                          ([str(path), "--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "k")],
                           "--tls-cert/--tls-key: no such file")):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_cli_refuses_bad_settings_in_one_line(model, tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    residual.save_model(model, path)
    for argv, message in (
            ([str(tmp_path / "missing.safetensors")], "missing.safetensors: no such file"),
            ([str(path), "--max-batch", "0"], "--max-batch must be at least 1, got 0"),
            ([str(path), "--port", "70000"], "--port must be between 0 and 65535, got 70000"),
            ([str(path), "--max-wait-ms", "-1"], "--max-wait-ms must be 0 or more"),
            ([str(tmp_path / "m.onnx"), "--compile"], "--compile: an exported model runs in ONNX Runtime")):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with serve(model) as busy:
        assert main(["serve", str(path), "--port", str(busy.port)]) == 2
        err = capsys.readouterr().err
        assert f"--port {busy.port}: cannot listen there" in err and "choose another --port" in err


def test_the_command_serves_until_sigterm_then_exits_cleanly(model, pictures, tmp_path):
    path = tmp_path / "tiny.safetensors"
    residual.save_model(model, path)
    process = subprocess.Popen([sys.executable, "-m", "residual", "serve", str(path), "--port", "0", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "300"})
    try:
        url = next(match.group(0) for line in process.stdout
                   if (match := re.search(r"http://127\.0\.0\.1:\d+", line)))
        status, body, _ = request(f"{url}/predict", pictures["a.png"])
        assert status == 200 and body["model"] == "tiny.safetensors"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped: every request in flight was answered" in out
    assert '"POST /predict HTTP/1.1" 200' in err  # the access log


def test_compiled_serving_answers_as_eager_with_one_graph(model, pictures):
    """--compile pads each batch to --max-batch, so batches of any size share the one graph compiled at warm-up."""
    body, headers = form(pictures)  # three images, then one: batches of 3 and 1
    with serve(model) as eager:
        want = request(f"{eager.url}/predict", body, headers)[1]["predictions"]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with serve(model, compile=True, max_batch=4) as server:
        got = request(f"{server.url}/predict", body, headers)[1]["predictions"]
        lone = request(f"{server.url}/predict", pictures["c.png"])[1]["predictions"][0]
        refused = request(f"{server.url}/explain", pictures["c.png"])
    assert refused[0] == 501 and "serve without --compile" in refused[1]["error"]
    assert counters["stats"]["unique_graphs"] == 1
    for ours, theirs in zip(got + [lone], want + [want[2]]):
        assert [row["class_id"] for row in ours["top"]] == [row["class_id"] for row in theirs["top"]]
        assert [row["probability"] for row in ours["top"]] == pytest.approx(
            [row["probability"] for row in theirs["top"]], abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU session runs it)")
def test_served_on_cuda_in_bf16_answers_as_on_the_cpu(model, pictures):
    """The default on a GPU: predict's fast path (BN folded, channels_last, bf16), the batcher thread
    running it on the device."""
    fast = residual.prepare_for_inference(copy.deepcopy(model), "cuda", "auto")
    body, headers = form(pictures)
    with serve(fast, max_batch=4) as server:
        got = request(f"{server.url}/predict", body, headers)[1]["predictions"]
        info = request(f"{server.url}/info")[1]
    assert info["device"].startswith("cuda") and info["precision"] in ("bfloat16", "float16")
    for answer, data in zip(got, pictures.values()):
        probabilities = torch.tensor([row["probability"] for row in sorted(answer["top"], key=lambda r: r["class_id"])])
        torch.testing.assert_close(probabilities, expected(model, data), atol=0.03, rtol=0)
