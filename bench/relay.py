"""The latency floor: a relay that forwards each record unchanged, with no model and no decoding.

    python -m bench.relay --bootstrap HOST:PORT --topic IN --out OUT [--transactional]
        [--consumer-config JSON]

It makes the same two broker trips as the worker (the feeder's records in, the outputs out),
with the worker's client settings: a ``read_committed`` consumer taking what is already
fetched (waiting only when nothing is), a producer with ``linger.ms=1`` and ``acks=all``.
At-least-once, it produces every record as it arrives and commits the consumed offsets
asynchronously every 100 ms; transactional, one transaction with the offsets every 100 ms
(the worker's ``commit_every_ms`` default). Whatever latency it has at a given rate, the
broker, the clients and the shared cores put there: no worker can do better on the same
machine, in the same way that no worker can beat the plain river loop's throughput.

Runs until SIGTERM, then commits and exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

COMMIT_EVERY = 0.1  #: seconds, the worker's commit_every_ms default
BATCH = 500  #: the worker's limits.batch_size default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--group", default=f"relay-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--transactional", action="store_true")
    parser.add_argument("--consumer-config", default="{}", help="extra consumer settings (JSON)")
    args = parser.parse_args()

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap, "group.id": args.group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed", **json.loads(args.consumer_config),
    })
    producer_conf = {"bootstrap.servers": args.bootstrap, "linger.ms": 1, "batch.num.messages": 10000, "acks": "all"}
    if args.transactional:
        producer_conf["transactional.id"] = f"{args.group}-txn"
    else:
        producer_conf["enable.idempotence"] = True
    producer = Producer(producer_conf)
    if args.transactional:
        producer.init_transactions()
    consumer.subscribe([args.topic])

    in_txn, last_commit, out = False, time.monotonic(), args.out

    def commit(final: bool = False) -> None:
        if args.transactional:
            producer.send_offsets_to_transaction(consumer.position(consumer.assignment()),
                                                 consumer.consumer_group_metadata())
            producer.commit_transaction()
            return
        if final:
            producer.flush(30)
        try:
            consumer.commit(asynchronous=not final)
        except KafkaException as exc:  # nothing new to commit
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                raise

    while not stopping:
        # What is already fetched; only when nothing is, wait for the first record.
        msgs = consumer.consume(BATCH, 0) or consumer.consume(1, 0.1)
        if msgs and args.transactional and not in_txn:
            producer.begin_transaction()
            in_txn = True
        for msg in msgs:
            if msg.error() is None:
                producer.produce(out, msg.value())
        producer.poll(0)
        if (in_txn or not args.transactional) and time.monotonic() - last_commit >= COMMIT_EVERY:
            commit()
            in_txn, last_commit = False, time.monotonic()
    if in_txn or not args.transactional:
        commit(final=True)
    consumer.close()


if __name__ == "__main__":
    main()
