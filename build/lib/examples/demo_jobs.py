"""Example jobs served by `fleetrun demo` (and a template for your own code location)."""

import sys
import time

from agent.sdk import Definitions, job, op


@op
def say_hello(context):
    context.log.info("hello from run %s", context.run_id)
    return "hello"


@job(tags={"example": "one_op"})
def hello():
    say_hello()


@op
def extract(context):
    return [1, 2, 3, 4]


@op
def transform(context, rows):
    return [r * 10 for r in rows]


@op
def load(context, rows):
    context.log.info("loaded %d rows, total %d", len(rows), sum(rows))
    return sum(rows)


@job(tags={"example": "chain"})
def etl():
    load(transform(extract()))


@op
def chatter(context):
    for i in range(3):
        print(f"stdout line {i}")
        print(f"stderr line {i}", file=sys.stderr)
        context.log.info("progress %d/3", i + 1)
        time.sleep(0.2)
    return "done"


@job(tags={"example": "logs"})
def chatty():
    chatter()


@op
def fetch(context):
    return {"rows": 0}


@op
def validate(context, batch):
    raise ValueError(f"expected at least one row, got {batch['rows']}")


@op
def publish(context, batch):
    return batch


@job(tags={"example": "failure"})
def broken():
    publish(validate(fetch()))


defs = Definitions(jobs=[hello, etl, chatty, broken])
