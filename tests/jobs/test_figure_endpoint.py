"""The figure endpoint serves only figures: the run's own ``.png``, under its run folder, of a sane
size checked before any GET of the body, streamed (:mod:`sparktf.airflow.ui_plugin`).

The route itself (Airflow's auth, the XCom and the run's conf) is exercised end to end in
``tests/e2e/test_airflow_rest.py``; here the checks run against the real S3 server through the
fault proxy, which counts what was requested.
"""

from __future__ import annotations

import pytest

from sparktf import storage
from sparktf.airflow.ui_plugin import FigureRefused, figure_refusal, open_figure, run_folder_uri
from sparktf_dev.faults import FaultProxy

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
RUN_ID = "manual__2026-11-24T10:00:00+00:00"


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint) as running:
        yield running


def client_through(proxy: FaultProxy, s3_server):
    return storage.client(proxy.settings(s3_server.settings()))


def test_the_run_folder_is_the_dags_run_uri(s3_prefix):
    assert run_folder_uri(s3_prefix, "tuning_pipeline", RUN_ID) == (f"{s3_prefix}/runs/tuning_pipeline/manual__2026-11-24T100000_0000/")


@pytest.mark.parametrize(
    ("uri", "served"),
    [
        ("{folder}tuning/error_vs_learning_rate.png", True),
        ("s3a://{bucket}/{key}tuning/error_vs_learning_rate.png", True),
        ("{ws}/runs/tuning_pipeline/another_run/tuning/error_vs_learning_rate.png", False),  # another run's
        ("{ws}/models/digits/v1/secret.png", False),  # outside every run folder
        ("s3://other-bucket/{key}tuning/error_vs_learning_rate.png", False),  # same key, another bucket
        ("{folder}../another_run/x.png", False),
        ("{folder}tuning//x.png", False),
        ("{folder}tuning/results.json", False),  # not a figure
        ("{folder}", False),
        ("https://example.com/x.png", False),
    ],
)
def test_only_a_png_inside_the_runs_own_folder_is_a_figure(s3_prefix, uri, served):
    folder = run_folder_uri(s3_prefix, "tuning_pipeline", RUN_ID)
    location = storage.parse_uri(folder)
    uri = uri.format(folder=folder, ws=s3_prefix, bucket=location.bucket, key=location.key)
    assert (figure_refusal(uri, folder) is None) is served


def test_a_figure_outside_the_run_folder_is_refused_without_reading_it(proxy, s3_server, s3_prefix):
    folder = run_folder_uri(s3_prefix, "tuning_pipeline", RUN_ID)
    elsewhere = f"{s3_prefix}/models/digits/v1/figure.png"
    storage.write_bytes(elsewhere, PNG)
    with pytest.raises(FigureRefused, match="run's own folder") as refused:
        open_figure(elsewhere, folder, client_through(proxy, s3_server))
    assert refused.value.status == 404
    assert proxy.requests == 0


def test_an_oversized_figure_is_refused_before_any_get_of_its_body(proxy, s3_server, s3_prefix):
    folder = run_folder_uri(s3_prefix, "tuning_pipeline", RUN_ID)
    huge = storage.join_uri(folder, "tuning/error_vs_learning_rate.png")
    storage.write_bytes(huge, PNG + b"\x00" * 5000)
    with pytest.raises(FigureRefused, match="over the 4096-byte cap") as refused:
        open_figure(huge, folder, client_through(proxy, s3_server), max_bytes=4096)
    key = storage.parse_uri(huge).key
    assert refused.value.status == 413
    assert proxy.requested[("HEAD", key)] == 1
    assert proxy.requested[("GET", key)] == 0


def test_the_runs_figure_is_streamed(proxy, s3_server, s3_prefix):
    folder = run_folder_uri(s3_prefix, "tuning_pipeline", RUN_ID)
    figure = storage.join_uri(folder, "tuning/error_vs_learning_rate.png")
    storage.write_bytes(figure, PNG)
    length, chunks = open_figure(figure, folder, client_through(proxy, s3_server))
    assert length == len(PNG)
    assert b"".join(chunks) == PNG
    not_png = storage.join_uri(folder, "tuning/fake.png")
    storage.write_bytes(not_png, b"<html>")
    with pytest.raises(FigureRefused, match="not a PNG"):
        open_figure(not_png, folder, client_through(proxy, s3_server))
