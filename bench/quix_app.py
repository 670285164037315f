"""Quix Streams with the same model in an ``apply`` (runs in Quix's own virtualenv).

    <quix-venv>/bin/python -m bench.quix_app --bootstrap HOST:PORT --topic IN --out OUT --records N
        [--guarantee at-least-once|exactly-once]

The documented way: ``Application`` -> ``dataframe(topic)`` -> ``apply`` (``predict_one``
then ``learn_one``, returning ``{"id", "prediction"}``) -> ``to_topic``. Quix's defaults
otherwise (JSON serdes, ``commit_interval`` 5 s). The app stops itself after ``N`` records;
``seconds`` runs from the first record to the return of ``app.run()``, which commits the last
checkpoint (and also includes Quix's shutdown, typically a few tens of milliseconds).
Imports only quixstreams and river: Quix pins its own confluent-kafka.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from quixstreams import Application
from river import linear_model, preprocessing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--group", default=f"quix-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--guarantee", choices=["at-least-once", "exactly-once"], default="at-least-once")
    parser.add_argument("--consumer-config", default="{}", help="extra consumer settings (JSON)")
    args = parser.parse_args()

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee=args.guarantee,
        consumer_extra_config=json.loads(args.consumer_config),
        loglevel="WARNING",
    )
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    predict, learn = model.predict_one, model.learn_one
    state = {"seen": 0, "first": None}

    def step(rec: dict) -> dict:
        if state["first"] is None:
            state["first"] = time.time()
        x = rec["x"]
        prediction = predict(x)
        learn(x, rec["y"])
        state["seen"] += 1
        if state["seen"] == args.records:
            app.stop()
        return {"id": rec["id"], "prediction": prediction}

    sdf = app.dataframe(app.topic(args.topic, value_deserializer="json"))
    sdf = sdf.apply(step)
    sdf.to_topic(app.topic(args.out, value_serializer="json"))
    app.run()
    end = time.time()
    first = state["first"]
    print(json.dumps({"records": state["seen"], "seconds": end - first if first else None, "first": first, "end": end}),
          flush=True)


if __name__ == "__main__":
    main()
