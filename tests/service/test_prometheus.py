"""A real Prometheus server scrapes the service, and PromQL reads the FLOPs histogram back."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import free_port, make_settings, running_server
from tests.service.test_api import predict

PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="needs the prometheus binary: install Debian's `prometheus` package",
)


def wait_for(check, timeout_s: float, description: str):
    """Poll `check` every 0.25 s until it returns a truthy value; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s} s waiting for {description}")


def query(prometheus: httpx.Client, promql: str) -> list[dict]:
    response = prometheus.get("/api/v1/query", params={"query": promql})
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_flops_histogram(tmp_path: Path, checkpoint_path, photos):
    with running_server(make_settings(checkpoint_path)) as service_url:
        target = service_url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: adamtl\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("w")
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with (
                httpx.Client(base_url=service_url, timeout=30) as client,
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as prometheus,
            ):
                wait_for(lambda: prometheus.get("/-/ready").status_code == 200, 60, "Prometheus")
                budgets = (1.0, 0.6, 0.3)
                for budget in budgets:
                    response = predict(client, photos["rocket.jpg"], budget)
                    assert response.status_code == 200, response.text
                static_flops = client.get("/v1/model").json()["static_flops"]

                count = wait_for(
                    lambda: query(prometheus, 'adamtl_image_flops_count{job="adamtl"} >= 3'),
                    30,
                    "a scrape that includes the three requests",
                )
                assert float(count[0]["value"][1]) >= 3
                up = query(prometheus, 'up{job="adamtl"}')
                assert up[0]["value"][1] == "1"

                # Half the images ran at most 0.7 of the static FLOPs (budgets 0.6 and 0.3).
                buckets = query(prometheus, 'adamtl_image_flops_bucket{job="adamtl"}')
                bounds = sorted(float(s["metric"]["le"]) for s in buckets)
                assert bounds[-2] == pytest.approx(1.1 * static_flops, rel=1e-5)
                median = query(
                    prometheus, 'histogram_quantile(0.5, adamtl_image_flops_bucket{job="adamtl"})'
                )
                median_flops = float(median[0]["value"][1])
                assert 0 < median_flops <= 0.8 * static_flops
                ratio = query(prometheus, 'adamtl_image_flops_ratio_sum{job="adamtl"}')
                assert float(ratio[0]["value"][1]) < len(budgets)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
