"""One training run (and its quantized variants) shared by the whole test session, and a
stand-in for botfleet-server's API."""

from __future__ import annotations

import pytest

from botfleet_pipeline import quantize, train


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    train.train(root, seed=0)
    return root


@pytest.fixture(scope="session")
def ptq(run_dir):
    return quantize.ptq(run_dir)


@pytest.fixture(scope="session")
def qat(run_dir):
    return quantize.qat(run_dir)


@pytest.fixture(scope="session")
def broken(run_dir):
    return quantize.ptq(run_dir, calibration="constant")


@pytest.fixture
def fake():
    """botfleet-server's API stand-in on loopback (tests/fake_server.py)."""
    from fake_server import start

    server, httpd = start()
    yield server
    httpd.shutdown()
    httpd.server_close()
