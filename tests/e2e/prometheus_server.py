"""A real Prometheus for the e2e tests (Debian's package, installed by `make install`)."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import subprocess
import time
import urllib.request

import yaml

from services.launcher import free_port


def need_binary(binary: str) -> str:
    path = shutil.which(binary)
    assert path, f"{binary} is not installed: run `make install` (installs Debian's prometheus package)"
    return path


@contextlib.contextmanager
def running_prometheus(config: dict, folder: pathlib.Path):
    """A real Prometheus with this configuration (written to folder/prometheus.yml): its URL, once ready."""
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            need_binary("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
