"""`residual serve` under load: images/s and latency over HTTP, against a plain loop in this script.

The server runs as `residual serve` would (its own process); clients are threads here, each
with a keep-alive connection, posting the encoded images one per request and waiting for each
answer. The peer is what a hand-written handler does with no HTTP at all: for each image,
decode, resize and crop with PIL, normalise, run the model on a batch of one, take the top
classes, in one thread of this process. Settings compared: no batching (--max-batch 1) and
dynamic batching with several --max-wait-ms, at 1 and at many concurrent clients. Rounds
alternate so the machine's drift hits every setting alike; the first round is warm-up.

    python benchmarks/serve_load.py [--rounds 3] [--clients 16] [--device cuda]

On a GPU (`--device cuda`) the server runs its default there (bf16, BN folded) and the plain loop
runs the fp32 model on the GPU, a batch of one at a time.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import residual
from predict_cpu import prepare  # the plain PIL resize and crop the predict benchmark's peers use

WORKLOADS = {  # name: model, images, their size (w, h), format, requests per client per setting
    "resnet20, 32 px PNGs": ("resnet20", 64, (32, 32), "PNG", 40),
    "resnet18, 320x256 JPEGs -> 224": ("resnet18", 32, (320, 256), "JPEG", 4),
}


def encoded_images(count: int, size: tuple[int, int], fmt: str, seed: int = 0) -> list[bytes]:
    """Smooth random pictures (JPEG-friendly, like photos more than noise), encoded."""
    generator = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = generator.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        picture.save(buffer, fmt, quality=90) if fmt == "JPEG" else picture.save(buffer, fmt)
        images.append(buffer.getvalue())
    return images


@torch.inference_mode()
def plain_loop(model, images: list[bytes], device: str) -> float:
    """Images/s of decode, crop, normalise and a batch-of-one forward, one image after another."""
    pre = model.preprocessing
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    start = time.perf_counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            pixels = prepare(image, pre.resize_size, pre.input_size)
        top = model(((pixels[None].to(device).float() / 255) - mean) / std).softmax(1).topk(5)
        top.values.cpu()  # the answer on the host, as a handler would send it
    return len(images) / (time.perf_counter() - start)


class Server:
    """`residual serve` in a process of its own, on a free port."""

    def __init__(self, model_file: Path, max_batch: int, max_wait_ms: float, device: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "residual", "serve", str(model_file), "--port", "0", "--quiet", "--device", device,
             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "500"})
        for line in self.process.stdout:
            if match := re.search(r"at http://127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                return
        raise RuntimeError("the server did not start")

    def close(self) -> None:
        self.process.send_signal(2)
        self.process.wait(timeout=60)


def load(port: int, images: list[bytes], clients: int, requests: int) -> tuple[float, list[float]]:
    """Images/s over `clients` threads each posting `requests` images, and every request's seconds."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        for index in range(requests):
            data = images[(offset + index) % len(images)]
            started = time.perf_counter()
            connection.request("POST", "/predict", body=data, headers={"Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
            mine.append(time.perf_counter() - started)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i * requests,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * requests / (time.perf_counter() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where the server and the plain loop run the model")
    args = parser.parse_args()
    torch.manual_seed(0)
    settings = [("no batching (--max-batch 1)", 1, 0.0, 1), ("no batching (--max-batch 1)", 1, 0.0, args.clients)]
    settings += [(f"batching, --max-wait-ms {wait:g}", 32, wait, clients)
                 for wait in (0.0, 2.0, 10.0) for clients in (1, args.clients)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; {args.clients} clients; "
          f"{args.rounds} timed rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for workload, (arch, count, size, fmt, per_client) in WORKLOADS.items():
            model = residual.create_model(arch, num_classes=10).eval()
            peer_model = residual.create_model(arch, num_classes=10).eval().to(args.device)
            peer_model.load_state_dict(model.state_dict())
            model_file = Path(tmp) / f"{arch}.safetensors"
            residual.save_model(model, model_file)
            images = encoded_images(count, size, fmt)
            results: dict = {}
            for round_index in range(args.rounds + 1):
                peer = plain_loop(peer_model, images, args.device)
                for name, batch, wait, clients in settings:
                    server = Server(model_file, batch, wait, args.device)
                    try:
                        rate, latencies = load(server.port, images, clients, per_client * max(1, 16 // clients))
                    finally:
                        server.close()
                    if round_index:
                        results.setdefault((name, clients), []).append((rate, latencies))
                if round_index:
                    results.setdefault(("plain loop, no HTTP (batch 1, one thread)", 1), []).append((peer, []))
            peer_rate = statistics.median(rate for rate, _ in results[("plain loop, no HTTP (batch 1, one thread)", 1)])
            print(f"\n{workload}\n| setting | clients | images/s | ratio to plain loop | p50 ms | p99 ms |")
            print("|---|---:|---:|---:|---:|---:|")
            for (name, clients), runs in results.items():
                rate = statistics.median(r for r, _ in runs)
                latencies = sorted(t for _, ts in runs for t in ts)
                p50, p99 = (f"{np.percentile(latencies, q) * 1e3:.1f}" if latencies else "" for q in (50, 99))
                print(f"| {name} | {clients} | {rate:.0f} | {rate / peer_rate:.2f} | {p50} | {p99} |")


if __name__ == "__main__":
    main()
