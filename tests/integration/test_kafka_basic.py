"""The Kafka transport on a real Apache Kafka broker: the happy path and SIGTERM."""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import (
    Topics,
    check_exactly_once,
    make_records,
    produce,
    read_outputs,
    worker_config,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_predictions_once_and_equal_to_plain_loop(kafka, workers, tmp_path, delivery):
    topics = Topics(kafka)
    records = make_records(4000)
    produce(kafka, topics.input, records, partitions=2)
    w = workers(worker_config(kafka, topics, tmp_path, delivery=delivery)).start()
    preds = read_outputs(kafka, topics.predictions, lambda out: len(out) >= len(records), timeout=60)
    t0 = time.monotonic()
    code = w.stop(timeout=15)
    assert code == 0, w.log()
    assert time.monotonic() - t0 < 10, "SIGTERM drain took longer than 10 s"
    check_exactly_once(preds, records, topics.input)
