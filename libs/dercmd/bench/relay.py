"""The bare relay: the yardstick dercmd's throughput is compared with (BRIEF 8).

``HOPS`` hops forward every record from ``bench.relay.<i>`` to ``bench.relay.<i+1>``, each
hop its own process (``python -m dercmd.bench.relay ...``) with at-least-once semantics and
no work besides forwarding:

- ``aiokafka``: ``getmany``, ``send`` every record of the batch, await every ack, commit.
- ``faust``: a faust-streaming agent over ``stream.take_events(max_, within)`` (``take()``'s
  twin that yields the events, so keys are kept) forwarding the batch with producer sends
  and awaiting the acks; faust acks the events after the batch and commits in the
  background. Its consumer's fetch wait is set low the way :mod:`dercmd.streams` does it,
  overriding faust's hard-coded 1,500 ms.

The driver (:func:`run`) creates the topics with the stack's partition count, starts the
hops, produces ``records`` records of ~150 bytes into topic 0 and times until all have
arrived on the last topic: records/s = records / (last arrival - first produced).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

HOPS = 4
TOPIC_PREFIX = "bench.relay"
KINDS = ("aiokafka", "faust")


def topic(i: int) -> str:
    return f"{TOPIC_PREFIX}.{i}"


# -- one hop (a process) ---------------------------------------------------------------


async def _aiokafka_hop(args: argparse.Namespace) -> None:
    consumer = AIOKafkaConsumer(
        args.source, bootstrap_servers=args.bootstrap, group_id=args.group, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=args.fetch_max_wait_ms,
        session_timeout_ms=10_000, heartbeat_interval_ms=2_000, request_timeout_ms=30_000,
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=args.linger_ms, acks="all",
                                request_timeout_ms=30_000)
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = False
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=args.max_records)
            if not ready and consumer.assignment():
                ready = _ready(args.ready_file)
            if not batches:
                continue
            acks = [
                await producer.send(args.target, r.value, key=r.key, headers=list(r.headers or ()))
                for records in batches.values()
                for r in records
            ]
            await asyncio.gather(*acks)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


def _faust_hop(args: argparse.Namespace) -> None:
    import faust
    from faust.transport.drivers import aiokafka as faust_aiokafka

    # faust hard-codes fetch_max_wait_ms=1500; replace its consumer thread to set our value
    # (the same override as dercmd.streams, kept here so the bench measures plain faust).
    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = args.fetch_max_wait_ms
            return consumer

    class LowWaitConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> ConsumerThread:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        Consumer = LowWaitConsumer

    class App(faust.App):
        def _new_transport(self) -> Any:
            return Transport(self.conf.broker_consumer, self, loop=self.loop)

    app = App(
        args.group, broker=f"kafka://{args.bootstrap}", store="memory://", autodiscover=False,
        processing_guarantee="at_least_once", topic_partitions=args.partitions,
        consumer_auto_offset_reset="earliest", broker_session_timeout=10, broker_heartbeat_interval=2,
        broker_request_timeout=30, broker_commit_interval=0.5, producer_linger=args.linger_ms / 1000,
        producer_acks=-1, web_enabled=False,
    )
    source = app.topic(args.source, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=args.partitions)

    @app.agent(source)
    async def hop(stream: Any) -> None:
        async for events in stream.take_events(args.max_records, within=args.within_s):
            acks = [
                await app.producer.send(args.target, e.message.key, e.message.value, None, None, e.message.headers)
                for e in events
            ]
            await asyncio.gather(*acks)

    announced = False

    @app.timer(0.1)
    async def announce() -> None:
        nonlocal announced
        if not announced and app.consumer.assignment():
            announced = _ready(args.ready_file)

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


def _ready(path: str) -> bool:
    Path(path).write_text(str(os.getpid()))
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dercmd.bench.relay", description="One relay hop.")
    parser.add_argument("--kind", choices=KINDS, default="aiokafka")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--ready-file", required=True, help="written once partitions are assigned")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-records", type=int, default=1000, help="batch size (getmany max_records / take max_)")
    parser.add_argument("--within-s", type=float, default=0.01, help="faust take(): longest wait to fill a batch")
    parser.add_argument("--fetch-max-wait-ms", type=int, default=20)
    parser.add_argument("--linger-ms", type=int, default=2)
    args = parser.parse_args(argv)
    if args.kind == "faust":
        _faust_hop(args)
    else:
        asyncio.run(_aiokafka_hop(args))


# -- the driver ------------------------------------------------------------------------


@dataclass
class RelayResult:
    kind: str
    hops: int
    records: int
    seconds: float
    arrived: int
    duplicates: int

    @property
    def records_per_s(self) -> float:
        return self.arrived / self.seconds if self.seconds > 0 else 0.0


async def _create_topics(bootstrap: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(topic(i), partitions, 1) for i in range(HOPS + 1) if topic(i) not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


def _record(i: int) -> tuple[bytes, bytes]:
    """~150 bytes, like a request: the sequence number first, so arrivals can be counted."""
    key = f"ev-{i % 20_000:06d}".encode()
    value = f'{{"seq": {i}, "id": "relay-{i:08d}", "entityId": "{key.decode()}", "type": "StartCharging"}}'
    return key, value.ljust(150).encode()


async def _measure(bootstrap: str, records: int, deadline_s: float) -> tuple[float, int, int]:
    consumer = AIOKafkaConsumer(topic(HOPS), bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=20)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_batch_size=256 * 1024)
    await consumer.start()
    await producer.start()
    try:
        first = time.time()
        for i in range(records):
            key, value = _record(i)
            await producer.send(topic(0), value, key=key)
        await producer.flush()
        seen: set[int] = set()
        arrivals = 0
        last = first
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while len(seen) < records and loop.time() < end:
            before = len(seen)
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                for r in batch:
                    arrivals += 1
                    seen.add(int(r.value[8 : r.value.index(b",")]))
            if len(seen) > before:
                last = time.time()
        return last - first, len(seen), arrivals - len(seen)
    finally:
        await producer.stop()
        await consumer.stop()


def run(bootstrap: str, partitions: int, records: int, kind: str, work_dir: Path, deadline_s: float = 300,
        max_records: int = 1000, within_s: float = 0.01, fetch_max_wait_ms: int = 20) -> RelayResult:
    """Start the hops, relay ``records`` records through them, stop the hops."""
    asyncio.run(_create_topics(bootstrap, partitions))
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        ready_files = []
        for i in range(HOPS):
            ready = work_dir / f"relay-{kind}-{i}.ready"
            ready.unlink(missing_ok=True)
            ready_files.append(ready)
            log = open(work_dir / "logs" / f"relay-{kind}-{i}.log", "ab")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dercmd.bench.relay", "--kind", kind, "--bootstrap", bootstrap,
                 "--source", topic(i), "--target", topic(i + 1), "--group", f"bench-relay-{kind}-{i}",
                 "--ready-file", str(ready), "--partitions", str(partitions), "--max-records", str(max_records),
                 "--within-s", str(within_s), "--fetch-max-wait-ms", str(fetch_max_wait_ms)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
        end = time.monotonic() + 90
        while not all(f.exists() for f in ready_files):
            for i, p in enumerate(procs):
                if p.poll() is not None:
                    raise RuntimeError(f"relay hop {i} exited with {p.returncode}: see {work_dir}/logs/relay-{kind}-{i}.log")
            if time.monotonic() > end:
                raise RuntimeError(f"relay hops not assigned within 90 s: see {work_dir}/logs/relay-{kind}-*.log")
            time.sleep(0.1)
        seconds, arrived, duplicates = asyncio.run(_measure(bootstrap, records, deadline_s))
        return RelayResult(kind, HOPS, records, seconds, arrived, duplicates)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


if __name__ == "__main__":
    main()
