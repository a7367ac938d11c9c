"""The real download path, against an HTTP server on 127.0.0.1."""

import functools
import hashlib
import http.server
import socket
import threading

import pytest
import torch

import residual
from residual.models.preprocessing import CIFAR_EVAL
from residual.weights import DOWNLOAD_TRIES, DownloadError, cache_dir, download, fetch_pretrained, sha256_of


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served over HTTP on a free loopback port; counts requests."""
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


def _free_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_good_file_is_downloaded_verified_and_then_served_from_cache(server, tmp_path):
    root, url, requests = server
    (root / "w.bin").write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(b"weights" * 1000).hexdigest()
    destination = tmp_path / "cache" / "w.bin"
    assert download(f"{url}/w.bin", destination, digest[:8], progress=False) == destination
    assert destination.read_bytes() == b"weights" * 1000
    assert len(requests) == 1
    download(f"{url}/w.bin", destination, digest, progress=False)  # cached: no second request
    assert len(requests) == 1
    assert [p.name for p in destination.parent.iterdir()] == ["w.bin"]


def test_corrupted_download_leaves_nothing_behind(server, tmp_path):
    root, url, _ = server
    (root / "w.bin").write_bytes(b"tampered bytes")
    destination = tmp_path / "cache" / "w.bin"
    expected = hashlib.sha256(b"the real bytes").hexdigest()
    with pytest.raises(DownloadError, match="does not match the published"):
        download(f"{url}/w.bin", destination, expected, progress=False)
    assert not destination.exists()
    assert list(destination.parent.iterdir()) == []


def test_corrupt_cached_file_is_replaced(server, tmp_path):
    root, url, requests = server
    (root / "w.bin").write_bytes(b"good")
    destination = tmp_path / "w.bin"
    destination.write_bytes(b"truncated")
    download(f"{url}/w.bin", destination, hashlib.sha256(b"good").hexdigest(), progress=False)
    assert destination.read_bytes() == b"good" and len(requests) == 1


def test_server_down_or_missing_file_says_where_to_put_it(server, tmp_path):
    destination = tmp_path / "cache" / "w.bin"
    with pytest.raises(DownloadError, match=f"put it at {destination}"):
        download(f"{_free_port_url()}/w.bin", destination, "0" * 64, progress=False)
    _, url, _ = server
    with pytest.raises(DownloadError, match="404"):
        download(f"{url}/absent.bin", destination, "0" * 64, progress=False)
    assert not destination.exists()


def test_progress_bar_shows_while_downloading(server, tmp_path, capsys):
    root, url, _ = server
    (root / "w.bin").write_bytes(b"x" * 300_000)
    download(f"{url}/w.bin", tmp_path / "w.bin", hashlib.sha256(b"x" * 300_000).hexdigest(), progress=True)
    assert "w.bin" in capsys.readouterr().err


class RangeServer:
    """Serves `body` at /w.bin on 127.0.0.1 as a CDN does: the whole file, or from a byte on (a Range request,
    206). `cuts`: for each of the first connections, after how many bytes of its answer it breaks off (its
    Content-Length promising more); `ranges`: whether it honours Range requests. `asked`: each request's Range
    header ("" for none)."""

    def __init__(self, body: bytes, cuts: list[int] = (), ranges: bool = True):
        self.body, self.cuts, self.ranges, self.asked = body, list(cuts), ranges, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                asked = self.headers.get("Range", "")
                server.asked.append(asked)
                start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and server.ranges else 0
                if start >= len(server.body) and asked:
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                part = server.body[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.body) - 1}/{len(server.body)}")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                self.wfile.write(part[:server.cuts.pop(0)] if server.cuts else part)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *_):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_port}/w.bin"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def range_server():
    servers = []

    def start(body: bytes, **how) -> RangeServer:
        servers.append(RangeServer(body, **how))
        return servers[-1]

    yield start
    for started in servers:
        started.close()


BODY = bytes(range(256)) * 4096  # 1 MiB


def test_a_connection_that_breaks_off_is_asked_for_the_rest(range_server, tmp_path, caplog):
    served = range_server(BODY, cuts=[300_000, 200_000])
    destination = tmp_path / "cache" / "w.bin"
    assert download(served.url, destination, hashlib.sha256(BODY).hexdigest(), progress=False) == destination
    assert destination.read_bytes() == BODY and served.asked == ["", "bytes=300000-", "bytes=500000-"]
    assert sorted(path.name for path in destination.parent.iterdir()) == ["w.bin"]  # no partial file left
    assert "the connection ended after 0.3 of 1.0 MB; asking for the rest (try 2 of 5)" in caplog.text


def test_a_download_stopped_goes_on_from_its_partial_file_the_next_time(range_server, tmp_path):
    served = range_server(BODY, cuts=[100_000] * DOWNLOAD_TRIES)  # every connection breaks off early
    destination = tmp_path / "cache" / "w.bin"
    digest = hashlib.sha256(BODY).hexdigest()
    partial = tmp_path / "cache" / ".w.bin.partial"
    with pytest.raises(DownloadError, match=r"the connection ended after 0\.5 of 1\.0 MB\); the 0\.5 MB that came "
                                            rf"are kept in {partial}, and the next try goes on from there"):
        download(served.url, destination, digest, progress=False)
    assert partial.stat().st_size == 500_000 and not destination.exists()
    assert download(served.url, destination, digest, progress=False).read_bytes() == BODY
    assert served.asked[-1] == "bytes=500000-" and not partial.exists()

    # A partial file already whole (stopped before its check): the server says there is no more, and it is kept.
    partial.write_bytes(BODY)
    destination.unlink()
    assert download(served.url, destination, digest, progress=False).read_bytes() == BODY
    assert served.asked[-1] == f"bytes={len(BODY)}-"


def test_a_server_that_ignores_ranges_sends_it_whole_again(range_server, tmp_path):
    served = range_server(BODY, cuts=[300_000], ranges=False)
    destination = tmp_path / "w.bin"
    assert download(served.url, destination, hashlib.sha256(BODY).hexdigest(), progress=False).read_bytes() == BODY
    assert served.asked == ["", "bytes=300000-"]  # answered from the start: the partial file begun again


def test_a_partial_file_that_does_not_add_up_is_let_go_and_the_next_try_starts_afresh(range_server, tmp_path):
    served = range_server(BODY)
    destination, digest = tmp_path / "w.bin", hashlib.sha256(BODY).hexdigest()
    (tmp_path / ".w.bin.partial").write_bytes(b"not the start of the file")
    with pytest.raises(DownloadError, match="does not match the published"):
        download(served.url, destination, digest, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert download(served.url, destination, digest, progress=False).read_bytes() == BODY


def test_two_processes_fetching_one_file_take_turns(server, tmp_path):
    """The second waits for the first's download (a lock on the partial file), then finds the file there."""
    root, url, requests = server
    (root / "w.bin").write_bytes(BODY)
    destination, digest = tmp_path / "cache" / "w.bin", hashlib.sha256(BODY).hexdigest()
    fetchers = [threading.Thread(target=download, args=(f"{url}/w.bin", destination, digest, False))
                for _ in range(2)]
    for fetcher in fetchers:
        fetcher.start()
    for fetcher in fetchers:
        fetcher.join(timeout=60)
    assert destination.read_bytes() == BODY and len(requests) == 1


@pytest.fixture
def published_resnet20(server):
    """A torchvision-layout checkpoint on the server, registered as pretrained weights."""
    root, url, requests = server
    source = residual.create_model("resnet20").eval()
    source.train()
    with torch.no_grad():
        source(torch.randn(8, 3, 32, 32))
    source.eval()
    path = root / "resnet20-test.pth"
    torch.save(source.state_dict(), path)
    entry = residual.PretrainedWeights("resnet20.test_cifar10", f"{url}/resnet20-test.pth", sha256_of(path)[:8],
                                       91.0, CIFAR_EVAL, "tests", classes="cifar10")
    residual.register_pretrained(entry)
    yield source, requests
    residual.weights._PRETRAINED.pop(entry.name)


def test_pretrained_name_downloads_once_and_loads_the_weights(published_resnet20):
    source, requests = published_resnet20
    x = torch.randn(2, 3, 32, 32)
    model = residual.create_model("resnet20.test_cifar10").eval()
    assert torch.equal(model(x), source(x))
    assert (cache_dir() / "resnet20-test.pth").is_file()
    again = residual.load_model("resnet20.test_cifar10").eval()
    assert torch.equal(again(x), source(x))
    assert len(requests) == 1, "the second load came from the cache"


def test_pretrained_backbone_with_new_head_and_one_input_channel(published_resnet20, caplog):
    source, _ = published_resnet20
    model = residual.create_model("resnet20.test_cifar10", num_classes=3, in_chans=1)
    assert model.fc.out_features == 3 and model.class_names is None
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer3[2].conv2.weight, source.layer3[2].conv2.weight)
    assert "classifier not loaded" in caplog.text


def test_mirror_replaces_the_host_and_the_hash_still_counts(published_resnet20, server, monkeypatch, tmp_path):
    root, url, _ = server
    mirror = root / "mirror"
    mirror.mkdir()
    (mirror / "resnet20-test.pth").write_bytes(b"not the published file")
    monkeypatch.setenv("RESIDUAL_WEIGHTS_MIRROR", f"{url}/mirror/")
    with pytest.raises(DownloadError, match="does not match"):
        fetch_pretrained("resnet20.test_cifar10", progress=False)
    (mirror / "resnet20-test.pth").write_bytes((root / "resnet20-test.pth").read_bytes())
    assert fetch_pretrained("resnet20.test_cifar10", progress=False).is_file()


def test_torchvision_registry_entries_are_complete():
    entries = residual.list_pretrained()
    names = {w.name for w in entries}
    for arch in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                 "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]:
        assert any(n.startswith(arch + ".") for n in names), arch
        assert arch in residual.list_models()
    assert {"resnet50.tv_in1k", "resnet50.tv2_in1k"} <= names
    for w in entries:
        assert w.url.startswith("https://download.pytorch.org/models/") and w.url.endswith(f"-{w.sha256}.pth")
        assert len(w.sha256) == 8 and int(w.sha256, 16) >= 0
    assert residual.weights.get_pretrained("resnet50").name == "resnet50.tv2_in1k"  # best published top-1
    assert residual.weights.get_pretrained("resnet50.tv2_in1k").preprocessing.resize_size == 232


def test_no_network_error_names_the_cache_file(monkeypatch):
    monkeypatch.setenv("RESIDUAL_WEIGHTS_MIRROR", _free_port_url())
    with pytest.raises(DownloadError, match=r"put it at .*residual-home/weights/resnet18-f37072fd\.pth"):
        residual.create_model("resnet18.tv_in1k")
