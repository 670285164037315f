"""The loop a competent engineer writes in an afternoon with confluent-kafka.

    python -m bench.handwritten --bootstrap HOST:PORT --topic IN --out OUT --records N [--transactional]

Consume a batch -> ``orjson.loads`` -> ``predict_one`` then ``learn_one`` -> produce
``{"id", "prediction"}``. At-least-once: after each batch, flush the producer (every output
acknowledged) and then commit the batch's offsets. Transactional: one transaction per batch
with the consumed offsets (``send_offsets_to_transaction``), as in confluent-kafka's
``eos_transactions.py``. No checkpoints, no metrics, no drift, no dead letters, no abort path.
Prints the harness's result line once ``N`` records are processed and committed.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from river import linear_model, preprocessing

from bench.harness import result

BATCH = 500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--group", default=f"hand-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--transactional", action="store_true")
    parser.add_argument("--consumer-config", default="{}", help="extra consumer settings (JSON)")
    args = parser.parse_args()

    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap, "group.id": args.group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed", **json.loads(args.consumer_config),
    })
    producer_conf = {"bootstrap.servers": args.bootstrap, "linger.ms": 20}
    if args.transactional:
        producer_conf["transactional.id"] = f"{args.group}-txn"
    else:
        producer_conf["enable.idempotence"] = True
    producer = Producer(producer_conf)
    if args.transactional:
        producer.init_transactions()
    consumer.subscribe([args.topic])

    seen, first = 0, None
    loads, dumps, predict, learn = orjson.loads, orjson.dumps, model.predict_one, model.learn_one
    while seen < args.records:
        msgs = consumer.consume(BATCH, 0.1)
        if not msgs:
            continue
        if first is None:
            first = time.time()
        if args.transactional:
            producer.begin_transaction()
        for msg in msgs:
            if msg.error() is not None:
                continue
            rec = loads(msg.value())
            x = rec["x"]
            prediction = predict(x)
            learn(x, rec["y"])
            out = dumps({"id": rec["id"], "prediction": prediction})
            while True:
                try:
                    producer.produce(args.out, out)
                    break
                except BufferError:
                    producer.poll(0.01)
            seen += 1
        if args.transactional:
            producer.send_offsets_to_transaction(
                consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
            )
            producer.commit_transaction()
        else:
            producer.flush()
            try:
                consumer.commit(asynchronous=seen < args.records)
            except KafkaException as exc:  # nothing new to commit (an earlier commit covered it)
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    raise
    end = time.time()
    consumer.close()
    result(seen, first, end)


if __name__ == "__main__":
    main()
