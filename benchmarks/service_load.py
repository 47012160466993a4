"""Load test of the HTTP service against the in-process predictor, measured in one run.

The benchmark starts `python -m service` as a subprocess on 127.0.0.1 and a free port, sends
640x480 JPEGs from concurrent clients, and reports throughput and p50/p99 end-to-end latency
per concurrency level. In alternation with the load, and never at the same time, it times
`Predictor.predict` in-process on the same checkpoint and images, in batches of
min(concurrency, max batch size): each concurrency level runs in `--rounds` rounds of
predictor batches, then requests, so that a drift of the machine's speed during the run
affects both sides alike. `throughput_ratio` (service over predictor) and
`latency_ratio` (service p50 over the predictor's median batch time) then show what HTTP,
JPEG decoding, PNG encoding and micro-batching cost. A soak at the end samples the service's
resident memory (VmRSS) after a warm-up, about every 0.25 s during `--soak-requests` requests,
and after them. The memory goal applies to the growth of the least-squares line through the
readings during the soak (`rss_trend_growth_ratio`), because single readings swing by several
percent with the requests in flight. `rss_growth_ratio` is the growth from the reading after
the warm-up to the one after the soak.

    python -m benchmarks.service_load --concurrency 1 4 16 --requests 200 --json

Without `--checkpoint`, checkpoints/demo.safetensors is served if it exists. Otherwise the demo
preset is built with random weights, calibrated on generated images and saved to a temporary
checkpoint, which is enough to measure serving overhead but not prediction quality. The
service and the predictor get the same torch thread count (ADAMTL_TORCH_THREADS and
torch.set_num_threads). Linux only, because resident memory is read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.model_latency import build_predictor
from model_core.allocator import reuse_freed_memory
from model_core.checkpoint import save_checkpoint
from model_core.predictor import Predictor
from service.imaging import decode_image
from service.settings import DEFAULT_CHECKPOINT, Settings
from training.cli import run_cli

logger = logging.getLogger("benchmarks.service_load")

HOST = "127.0.0.1"  # the only address this benchmark sends traffic to
IMAGE_WIDTH, IMAGE_HEIGHT = 640, 480
THROUGHPUT_GOAL = 0.85  # minimum service/predictor throughput ratio at concurrency 16
LATENCY_GOAL = 1.3  # maximum service/predictor latency ratio at concurrency 1
RSS_GROWTH_GOAL = 0.05  # maximum relative growth of resident memory over the soak
_SERVICE_DEFAULTS = Settings.model_fields


# Conditions copied into every JSON row.
ROW_CONDITIONS = (
    "budget", "threads", "max_batch_size", "max_batch_wait_ms", "preset", "checkpoint",
    "checkpoint_source", "service_pid",
)  # fmt: skip


class BenchmarkError(RuntimeError):
    """The benchmark cannot run as requested. The message names the cause and the fix."""


def default_threads() -> int:
    """Return half the CPUs this process may use, at least 1.

    The client, JPEG decoding and PNG encoding run on the same machine as inference, so torch
    gets half the cores instead of all of them.
    """
    return max(1, len(os.sched_getaffinity(0)) // 2)


# Images


def generate_jpegs(count: int, seed: int) -> list[bytes]:
    """Encode `count` different 640x480 JPEGs: smooth colour fields, shapes and noise."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for index in range(count):
        coarse = rng.random((3 + 2 * index, 4 + 2 * index, 3))  # from large blobs to small ones
        field_image = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
            (IMAGE_WIDTH, IMAGE_HEIGHT), Image.Resampling.BICUBIC
        )
        draw = ImageDraw.Draw(field_image)
        for _ in range(4 + 3 * index):
            x0, y0 = rng.integers(0, IMAGE_WIDTH - 40), rng.integers(0, IMAGE_HEIGHT - 40)
            x1, y1 = x0 + rng.integers(20, 240), y0 + rng.integers(20, 180)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
        pixels = np.asarray(field_image, dtype=np.float32)
        pixels += rng.normal(0.0, 4.0 + 4.0 * index, pixels.shape)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


# Checkpoint


def resolve_checkpoint(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """Return the checkpoint to serve and a description of where it came from.

    Raises:
        BenchmarkError: `--checkpoint` names a file that does not exist.
    """
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise BenchmarkError(
                f"checkpoint not found: {args.checkpoint}. Pass an existing .safetensors file, "
                "or leave out --checkpoint to use a random-weight demo model"
            )
        return args.checkpoint.resolve(), "file"
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT.resolve(), "file"

    logger.info(
        "%s not found, so the demo preset is built with random weights and calibrated on %d "
        "generated images",
        DEFAULT_CHECKPOINT,
        args.calibration_images,
    )
    predictor = build_predictor("demo", None, args.calibration_images, args.seed)
    path = workdir / "demo-random.safetensors"
    save_checkpoint(
        predictor.model,
        path,
        name="adamtl-demo-random",
        version="untrained",
        provenance={"recipe": "random weights, calibrated on generated images"},
    )
    return path, "temporary checkpoint: random weights, calibrated on generated images"


# Service process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def read_rss_bytes(pid: int) -> int:
    """Read the resident set size (VmRSS) of process `pid` from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line, so process {pid} has exited")


@dataclass(frozen=True)
class ServiceConfig:
    checkpoint: Path
    threads: int
    max_batch_size: int
    max_batch_wait_ms: float
    max_queue_size: int
    start_timeout_s: float
    log_path: Path


@contextmanager
def running_service(config: ServiceConfig) -> Iterator[tuple[str, int]]:
    """Start `python -m service` on 127.0.0.1, wait for /readyz, yield (base URL, pid).

    The process is stopped on exit from the block, also on errors and Ctrl-C: SIGTERM first,
    then SIGKILL if it has not exited 60 s later.
    """
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("ADAMTL_")}
    env.update(
        ADAMTL_TORCH_THREADS=str(config.threads),
        ADAMTL_MAX_BATCH_SIZE=str(config.max_batch_size),
        ADAMTL_MAX_BATCH_WAIT_MS=str(config.max_batch_wait_ms),
        ADAMTL_MAX_QUEUE_SIZE=str(config.max_queue_size),
    )
    command = [
        sys.executable, "-m", "service", "--host", HOST, "--port", str(port),
        "--checkpoint", str(config.checkpoint),
    ]  # fmt: skip
    with open(config.log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    logger.info("started the service (pid %d) on %s:%d", process.pid, HOST, port)
    url = f"http://{HOST}:{port}"
    try:
        wait_until_ready(process, url, config)
        yield url, process.pid
    finally:
        stop_service(process)


def wait_until_ready(process: subprocess.Popen, url: str, config: ServiceConfig) -> None:
    """Poll /readyz until it returns 200. Raise BenchmarkError if the process exits or times out."""
    deadline = time.monotonic() + config.start_timeout_s
    with httpx.Client(base_url=url, timeout=5.0, trust_env=False) as client:
        while True:
            if process.poll() is not None:
                raise BenchmarkError(
                    f"the service exited with return code {process.returncode} during start-up. "
                    "Service log:\n" + log_tail(config.log_path)
                )
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"timed out after {config.start_timeout_s:g} s waiting for the service's "
                    "/readyz. Raise --start-timeout-s if the machine is slow. Service log:\n"
                    + log_tail(config.log_path)
                )
            time.sleep(0.2)


def stop_service(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            logger.warning(
                "the service (pid %d) did not exit within 60 s of SIGTERM: killing it", process.pid
            )
            process.kill()
            process.wait()
    logger.info("stopped the service (pid %d, return code %d)", process.pid, process.returncode)


def log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# Client load


@dataclass
class LoadResult:
    """Outcome of one load phase: latencies of successful requests and the failures."""

    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    # (time.monotonic(), resident bytes) readings taken during the phase.
    rss_samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.latencies_s)


async def send_requests(
    client: httpx.AsyncClient,
    jpegs: Sequence[bytes],
    budget: float,
    count: int,
    concurrency: int,
    deadline: float,
) -> LoadResult:
    """Send `count` POST /predict requests from `concurrency` workers, each awaiting its response.

    Workers stop taking new requests at `deadline` (time.monotonic), so a phase ends at most
    one request timeout after it.
    """
    result = LoadResult()
    indices = iter(range(count))

    async def worker() -> None:
        for index in indices:
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/predict",
                    params={"budget": budget},
                    content=jpegs[index % len(jpegs)],
                    headers={"Content-Type": "image/jpeg"},
                )
            except httpx.HTTPError as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - started
            if response.status_code == 200:
                result.latencies_s.append(elapsed)
            else:
                result.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started
    return result


async def sample_rss(pid: int, samples: list[tuple[float, int]], interval_s: float = 0.25) -> None:
    """Append (time.monotonic(), RSS of `pid`) to `samples` about every `interval_s` until
    cancelled."""
    while True:
        samples.append((time.monotonic(), read_rss_bytes(pid)))
        await asyncio.sleep(interval_s)


def make_client(url: str, concurrency: int) -> httpx.AsyncClient:
    # trust_env=False ignores proxy variables, so requests always go straight to 127.0.0.1.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits, trust_env=False)


async def check_response(
    client: httpx.AsyncClient, jpeg: bytes, budget: float, tasks: Sequence[str]
) -> None:
    """Send one request and raise unless it returns every task's map at the image's size."""
    response = await client.post(
        "/predict",
        params={"budget": budget},
        content=jpeg,
        headers={"Content-Type": "image/jpeg"},
    )
    if response.status_code != 200:
        raise BenchmarkError(f"POST /predict failed: HTTP {response.status_code}: {response.text}")
    body = response.json()
    if sorted(body["outputs"]) != sorted(tasks):
        raise BenchmarkError(f"the service returned tasks {sorted(body['outputs'])}, not {tasks}")
    size = (body["image"]["width"], body["image"]["height"])
    if size != (IMAGE_WIDTH, IMAGE_HEIGHT):
        raise BenchmarkError(f"the service read the image as {size}, not 640x480")


async def run_load_phase(
    url: str,
    jpegs: Sequence[bytes],
    budget: float,
    concurrency: int,
    warmup: int,
    count: int,
    time_limit_s: float,
    rss_pid: int | None = None,
) -> tuple[LoadResult, dict[str, float]]:
    """Warm up, then send `count` timed requests and return the result and the batch totals.

    The batch totals are the increase of the service's histogram sums and counts over the timed
    requests (see `read_batch_totals`). With `rss_pid`, RSS is sampled during the timed requests.
    """
    async with make_client(url, concurrency) as client:
        deadline = time.monotonic() + time_limit_s
        await send_requests(client, jpegs, budget, warmup, concurrency, deadline)
        before = await read_batch_totals(client)
        sampler = None
        samples: list[tuple[float, int]] = []
        if rss_pid is not None:
            sampler = asyncio.create_task(sample_rss(rss_pid, samples))
        try:
            result = await send_requests(client, jpegs, budget, count, concurrency, deadline)
        finally:
            if sampler is not None:
                sampler.cancel()
        result.rss_samples = samples
        after = await read_batch_totals(client)
    totals = {key: after[key] - before[key] for key in after}
    return result, totals


# Service histograms read from /metrics: images per batch, and seconds per batch of the batched
# forward pass with pre-processing. The service resizes and encodes each image's maps
# afterwards, on its image threads, so this is less work than `Predictor.predict` does.
_BATCH_HISTOGRAMS = ("adamtl_batch_size", "adamtl_inference_duration_seconds")


async def read_batch_totals(client: httpx.AsyncClient) -> dict[str, float]:
    """Read the `_sum` and `_count` of each histogram in `_BATCH_HISTOGRAMS` from /metrics."""
    response = await client.get("/metrics")
    response.raise_for_status()
    wanted = {f"{name}{suffix}" for name in _BATCH_HISTOGRAMS for suffix in ("_sum", "_count")}
    totals = dict.fromkeys(sorted(wanted), 0.0)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in wanted:
                totals[sample.name] = sample.value
    return totals


# In-process predictor


@dataclass(frozen=True)
class PredictorTiming:
    images_per_s: float
    batch_ms: float  # median duration of one predict call in milliseconds
    durations_s: tuple[float, ...] = ()  # every timed predict call, in seconds

    @classmethod
    def from_durations(cls, durations_s: Sequence[float], batch_size: int) -> PredictorTiming:
        return cls(
            images_per_s=batch_size * len(durations_s) / sum(durations_s),
            batch_ms=1000 * statistics.median(durations_s),
            durations_s=tuple(durations_s),
        )

    def merged(self, other: PredictorTiming, batch_size: int) -> PredictorTiming:
        return PredictorTiming.from_durations(self.durations_s + other.durations_s, batch_size)


def time_predictor(
    predictor: Predictor,
    images: Sequence[Image.Image],
    batch_size: int,
    budget: float,
    image_count: int,
    time_limit_s: float,
) -> PredictorTiming:
    """Time `predict` on batches of `batch_size` images, about `image_count` images in all."""
    batches = max(2, math.ceil(image_count / batch_size))
    cycle = itertools.cycle(images)
    predictor.predict([next(cycle) for _ in range(batch_size)], budget)  # warm-up
    durations = []
    deadline = time.monotonic() + time_limit_s
    for _ in range(batches):
        if durations and time.monotonic() > deadline:
            break
        batch = [next(cycle) for _ in range(batch_size)]
        started = time.perf_counter()
        predictor.predict(batch, budget)
        durations.append(time.perf_counter() - started)
    return PredictorTiming.from_durations(durations, batch_size)


# Benchmark


def percentile_ms(latencies_s: Sequence[float], q: float) -> float:
    if not latencies_s:
        return math.nan
    return 1000 * float(np.percentile(latencies_s, q))


def report_errors(phase: str, result: LoadResult) -> None:
    if result.errors:
        logger.warning(
            "%s: %d requests failed, first: %s", phase, len(result.errors), result.errors[0]
        )


def service_config(args: argparse.Namespace, checkpoint: Path, workdir: Path) -> ServiceConfig:
    # The admission limit covers every concurrency level, so no request gets a 503 queue_full.
    max_queue_size = max(
        _SERVICE_DEFAULTS["max_queue_size"].default,
        args.max_batch_size,
        *args.concurrency,
        args.soak_concurrency,
    )
    return ServiceConfig(
        checkpoint=checkpoint,
        threads=args.threads,
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        max_queue_size=max_queue_size,
        start_timeout_s=args.start_timeout_s,
        log_path=workdir / "service.log",
    )


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Run every phase and return one row per concurrency level and the run's conditions."""
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # in this process too: the service sets it by default
    jpegs = generate_jpegs(args.images, args.seed)
    with tempfile.TemporaryDirectory(prefix="adamtl-service-load-") as directory:
        workdir = Path(directory)
        checkpoint, source = resolve_checkpoint(args, workdir)
        logger.info("checkpoint: %s (%s)", checkpoint, source)
        predictor = Predictor.from_checkpoint(checkpoint)
        low, high = predictor.budget_range
        if not low <= args.budget <= high:
            raise BenchmarkError(
                f"invalid --budget {args.budget}: this checkpoint accepts [{low:g}, {high:g}]"
            )
        images = [
            decode_image(jpeg, _SERVICE_DEFAULTS["max_image_pixels"].default) for jpeg in jpegs
        ]
        tasks = list(predictor.tasks)
        conditions = {
            "checkpoint": str(checkpoint),
            "checkpoint_source": source,
            "preset": predictor.config.name,
            "threads": args.threads,
            "cpus": len(os.sched_getaffinity(0)),
            "max_batch_size": args.max_batch_size,
            "max_batch_wait_ms": args.max_batch_wait_ms,
            "budget": args.budget,
            "tasks": tasks,
        }
        service = service_config(args, checkpoint, workdir)

        levels = []
        with running_service(service) as (url, pid):
            conditions["service_pid"] = pid
            asyncio.run(check_first_response(url, jpegs[0], args.budget, tasks))
            # The service sits idle while the in-process predictor is timed, and the other way
            # round, so the two never compete for the CPU.
            for concurrency in args.concurrency:
                batch_size = min(concurrency, args.max_batch_size)
                # The rounds together send --requests requests. Each sends at least
                # `concurrency`, so that every round loads the service at that concurrency.
                rounds = max(1, min(args.rounds, args.requests // concurrency))
                shares = [len(part) for part in np.array_split(np.arange(args.requests), rounds)]
                timing: PredictorTiming | None = None
                result, batches = LoadResult(), {}
                for round_index, count in enumerate(shares):
                    logger.info(
                        "concurrency %d, round %d of %d: predictor at batch size %d, then %d "
                        "requests",
                        concurrency,
                        round_index + 1,
                        rounds,
                        batch_size,
                        count,
                    )
                    part = time_predictor(
                        predictor, images, batch_size, args.budget, count, args.phase_timeout_s
                    )
                    timing = part if timing is None else timing.merged(part, batch_size)
                    warmup = min(2 * concurrency, args.requests) if round_index == 0 else 0
                    round_result, round_batches = asyncio.run(
                        run_load_phase(
                            url,
                            jpegs,
                            args.budget,
                            concurrency,
                            warmup=warmup,
                            count=count,
                            time_limit_s=args.phase_timeout_s,
                        )
                    )
                    result.latencies_s += round_result.latencies_s
                    result.errors += round_result.errors
                    result.wall_s += round_result.wall_s
                    for key, value in round_batches.items():
                        batches[key] = batches.get(key, 0.0) + value
                report_errors(f"concurrency {concurrency}", result)
                assert timing is not None
                levels.append((concurrency, batch_size, result, batches, timing))

            # Batch size 1 was timed at concurrency 1, when that level ran.
            single = next((level[4] for level in levels if level[1] == 1), None)
            if single is None:
                logger.info("timing the in-process predictor at batch size 1")
                single = time_predictor(
                    predictor, images, 1, args.budget, args.requests, args.phase_timeout_s
                )
            soak = run_soak(args, url, jpegs, pid)

    rows = [
        load_row(concurrency, batch_size, args.requests, result, batches, timing, single)
        for concurrency, batch_size, result, batches, timing in levels
    ]

    # Every row carries the soak and the run's conditions, so each JSON line is self-contained.
    shared = {key: conditions[key] for key in ROW_CONDITIONS}
    rows = [{**row, **soak, **shared} for row in rows]
    return rows, conditions


async def check_first_response(url: str, jpeg: bytes, budget: float, tasks: Sequence[str]) -> None:
    async with make_client(url, 1) as client:
        await check_response(client, jpeg, budget, tasks)


def mean_of(totals: dict[str, float], histogram: str) -> float:
    """Return a histogram's mean over a phase, NaN if it observed nothing."""
    count = totals[f"{histogram}_count"]
    return totals[f"{histogram}_sum"] / count if count else math.nan


def load_row(
    concurrency: int,
    batch_size: int,
    requests: int,
    result: LoadResult,
    batches: dict[str, float],
    timing: PredictorTiming,
    single: PredictorTiming,
) -> dict:
    throughput = result.completed / result.wall_s if result.wall_s > 0 else math.nan
    p50_ms = percentile_ms(result.latencies_s, 50)
    return {
        "concurrency": concurrency,
        "batch_size": batch_size,
        "requests": requests,
        "completed": result.completed,
        "errors": len(result.errors),
        "throughput_rps": round(throughput, 3),
        "predictor_rps": round(timing.images_per_s, 3),
        "throughput_ratio": round(throughput / timing.images_per_s, 4),
        "p50_ms": round(p50_ms, 2),
        "p99_ms": round(percentile_ms(result.latencies_s, 99), 2),
        "predictor_batch_ms": round(timing.batch_ms, 2),
        "predictor_single_ms": round(single.batch_ms, 2),
        "latency_ratio": round(p50_ms / timing.batch_ms, 4),
        "service_mean_batch": round(mean_of(batches, "adamtl_batch_size"), 2),
        "service_batch_ms": round(1000 * mean_of(batches, "adamtl_inference_duration_seconds"), 2),
    }


def run_soak(args: argparse.Namespace, url: str, jpegs: Sequence[bytes], pid: int) -> dict:
    """Warm up, read RSS, send `--soak-requests` requests, read RSS again."""
    warmup = min(args.soak_requests, max(2 * args.soak_concurrency, args.soak_requests // 10))
    logger.info(
        "soak: %d warm-up and %d timed requests at concurrency %d",
        warmup,
        args.soak_requests,
        args.soak_concurrency,
    )
    asyncio.run(
        run_load_phase(
            url, jpegs, args.budget, args.soak_concurrency, warmup, 0, args.phase_timeout_s
        )
    )
    rss_warm = read_rss_bytes(pid)
    result, _ = asyncio.run(
        run_load_phase(
            url,
            jpegs,
            args.budget,
            args.soak_concurrency,
            warmup=0,
            count=args.soak_requests,
            time_limit_s=args.phase_timeout_s,
            rss_pid=pid,
        )
    )
    rss_after = read_rss_bytes(pid)
    report_errors("soak", result)
    mib = 1024 * 1024
    return {
        "soak_requests": args.soak_requests,
        "soak_completed": result.completed,
        "soak_errors": len(result.errors),
        "rss_warm_mib": round(rss_warm / mib, 1),
        "rss_after_mib": round(rss_after / mib, 1),
        "rss_peak_mib": round(max([rss_after, *(rss for _, rss in result.rss_samples)]) / mib, 1),
        "rss_growth_ratio": round(rss_after / rss_warm - 1, 4),
        "rss_trend_growth_ratio": round(trend_growth(result.rss_samples), 4),
    }


def trend_growth(samples: Sequence[tuple[float, int]]) -> float:
    """Return the relative rise of the least-squares line through (time, RSS) `samples`, from
    the first sample's time to the last one's.

    Two single readings of resident memory differ by several percent either way, depending on
    the buffers of the requests in flight and on whether the service's malloc_trim has just
    run. The fitted line follows only the drift. Fewer than 2 samples give 0.
    """
    if len(samples) < 2:
        return 0.0
    times = [t - samples[0][0] for t, _ in samples]
    values = [float(rss) for _, rss in samples]
    slope, intercept = statistics.linear_regression(times, values)
    return slope * times[-1] / intercept


# Output


def print_table(rows: list[dict], conditions: dict) -> None:
    print(
        f"checkpoint: {conditions['checkpoint']} ({conditions['checkpoint_source']}), preset "
        f"{conditions['preset']}"
    )
    print(
        f"budget {conditions['budget']:g}, tasks {','.join(conditions['tasks'])}, 640x480 JPEGs, "
        f"torch threads {conditions['threads']} of {conditions['cpus']} CPUs, max batch size "
        f"{conditions['max_batch_size']}, max batch wait {conditions['max_batch_wait_ms']:g} ms"
    )
    print()
    print(
        "| concurrency | batch | completed | errors | service rps | predictor rps | rps ratio "
        "| p50 ms | p99 ms | predictor batch ms | latency ratio | service batch size "
        "| service batch ms |"
    )
    print("|" + "---|" * 13)
    for row in rows:
        print(
            f"| {row['concurrency']} | {row['batch_size']} | {row['completed']} | {row['errors']} "
            f"| {row['throughput_rps']:.2f} | {row['predictor_rps']:.2f} "
            f"| {row['throughput_ratio']:.3f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
            f"| {row['predictor_batch_ms']:.1f} | {row['latency_ratio']:.3f} "
            f"| {row['service_mean_batch']:.2f} | {row['service_batch_ms']:.1f} |"
        )
    soak = rows[0]
    print()
    print(
        f"predictor single-image latency: {soak['predictor_single_ms']:.1f} ms (median)\n"
        f"soak: {soak['soak_completed']} of {soak['soak_requests']} requests, "
        f"{soak['soak_errors']} errors; service RSS {soak['rss_warm_mib']:.1f} MiB after warm-up, "
        f"{soak['rss_after_mib']:.1f} MiB after the soak "
        f"({100 * soak['rss_growth_ratio']:+.2f} %, peak {soak['rss_peak_mib']:.1f} MiB); "
        f"growth of the fitted trend {100 * soak['rss_trend_growth_ratio']:+.2f} %"
    )
    for line in goal_lines(rows):
        print(line)


def goal_lines(rows: list[dict]) -> list[str]:
    by_concurrency = {row["concurrency"]: row for row in rows}
    lines = []
    if 16 in by_concurrency:
        ratio = by_concurrency[16]["throughput_ratio"]
        met = "met" if ratio >= THROUGHPUT_GOAL else "missed"
        lines.append(
            f"goal throughput ratio at concurrency 16 >= {THROUGHPUT_GOAL}: {ratio:.3f}, {met}"
        )
    if 1 in by_concurrency:
        ratio = by_concurrency[1]["latency_ratio"]
        met = "met" if ratio <= LATENCY_GOAL else "missed"
        lines.append(f"goal latency ratio at concurrency 1 <= {LATENCY_GOAL}: {ratio:.3f}, {met}")
    growth = rows[0]["rss_trend_growth_ratio"]
    met = "met" if abs(growth) <= RSS_GROWTH_GOAL else "missed"
    lines.append(f"goal RSS trend within {100 * RSS_GROWTH_GOAL:g} %: {100 * growth:+.2f} %, {met}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"checkpoint to serve (default: {DEFAULT_CHECKPOINT} if it exists, otherwise a "
        "random-weight demo model in a temporary checkpoint)",
    )
    model.add_argument(
        "--calibration-images",
        type=int,
        default=16,
        help="generated images to calibrate the random-weight demo model on",
    )
    model.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="torch threads of both the service and the in-process predictor (default: half "
        "the CPUs, %(default)s here)",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients"
    )
    load.add_argument(
        "--requests", type=int, default=200, help="timed requests per concurrency level"
    )
    load.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="alternations of predictor timing and requests per concurrency level; fewer when "
        "a round would get fewer requests than the concurrency",
    )
    load.add_argument("--budget", type=float, default=0.6, help="compute budget of every request")
    load.add_argument("--images", type=int, default=4, help="different generated JPEGs to send")
    load.add_argument("--soak-requests", type=int, default=2000, help="requests of the memory soak")
    load.add_argument(
        "--soak-concurrency", type=int, default=16, help="concurrent clients during the soak"
    )

    service = parser.add_argument_group("service")
    service.add_argument(
        "--max-batch-size",
        type=int,
        default=_SERVICE_DEFAULTS["max_batch_size"].default,
        help="ADAMTL_MAX_BATCH_SIZE of the service (default: the service's, %(default)s)",
    )
    service.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=_SERVICE_DEFAULTS["max_batch_wait_ms"].default,
        help="ADAMTL_MAX_BATCH_WAIT_MS of the service (default: the service's, %(default)s)",
    )
    service.add_argument(
        "--start-timeout-s",
        type=float,
        default=300.0,
        help="seconds to wait for the service's /readyz",
    )
    service.add_argument(
        "--phase-timeout-s",
        type=float,
        default=600.0,
        help="seconds after which a load or predictor phase sends no new requests or batches",
    )

    parser.add_argument("--seed", type=int, default=0, help="seed of weights and generated images")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per row instead of a table"
    )
    args = parser.parse_args(argv)
    positive = {
        "--concurrency": min(args.concurrency),
        "--requests": args.requests,
        "--rounds": args.rounds,
        "--images": args.images,
        "--soak-requests": args.soak_requests,
        "--soak-concurrency": args.soak_concurrency,
        "--threads": args.threads,
        "--max-batch-size": args.max_batch_size,
        "--calibration-images": args.calibration_images,
    }
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    for flag, value in {
        "--start-timeout-s": args.start_timeout_s,
        "--phase-timeout-s": args.phase_timeout_s,
    }.items():
        if not value > 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.max_batch_wait_ms < 0:
        parser.error(f"--max-batch-wait-ms must not be negative, got {args.max_batch_wait_ms}")
    return args


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Raising here unwinds through the `finally` blocks, which stop the service.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    logger.setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        rows, conditions = measure(args)
    except BenchmarkError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("benchmark interrupted, service stopped")
        return 130
    if args.json:
        for row in rows:
            # NaN (no successful request in a phase) becomes null, because JSON has no NaN.
            cleaned = {
                key: None if isinstance(value, float) and math.isnan(value) else value
                for key, value in row.items()
            }
            print(json.dumps(cleaned, allow_nan=False))
    else:
        print_table(rows, conditions)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("python -m benchmarks.service_load", main))
