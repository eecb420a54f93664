"""``python -m dercmd.bench`` / ``make bench BENCH_ARGS="..."``: start the whole stack on free
ports, offer it a burst and a paced load, run a bare relay on the same broker, and print
every figure as a markdown table (``--json FILE`` writes them too).

Phases, in order:

0. A fleet file of ``--fleet-load`` entities loaded in a new process (:mod:`.fleetload`):
   seconds, memory kept and peak, before anything else runs.
1. Redis bytes per entity (:mod:`.redismem`), while the stack is idle, in its own database.
2. Burst: one command per entity, produced as fast as the client goes; until every command
   is terminal or ``--timeout``.
3. Latency: ``--rate`` commands/s for ``--latency-seconds`` to the same entities (the stack
   runs with ``DERCMD_COOLDOWN_S=0``), then device receipts are read from the simulator.
4. Window (:mod:`.window`): one curtailment window for ``--window`` inverters through the
   batch API, starting ``--window-lead`` s ahead: how late each device got its start and
   its revert.
5. The bare relay (:mod:`.relay`), ``--relay aiokafka`` (default) or ``faust``.

``--faults P``: the simulator injects faults (every kind of :mod:`dercmd.simulator.faults`) on
a share P of calls from the start; the table then says how many commands a device got twice
and how many ended with a status that disagrees with what the device got (Succeeded but never
received, or Failed / Canceled although received).

Every figure depends on this machine and whatever else runs on it: indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import httpx
import redis

from dercmd.fleet import Fleet
from dercmd.launcher import LaunchError, Stack, isolated_env

from . import fleetgen, fleetload, procstat, redismem, relay, window
from .load import KafkaLoad, Offered, RestLoad, StatusWatcher, new_command_id, receipts
from .report import machine, ms, per_s, percentile, table, untruthful


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dercmd.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=20_000, help="fleet size (default 20,000)")
    p.add_argument("--burst", type=int, default=None, help="burst commands, one per entity (default: --entities)")
    p.add_argument("--rate", type=float, default=1000, help="latency phase: commands/s offered (default 1,000)")
    p.add_argument("--latency-seconds", type=float, default=10, help="latency phase: how long (default 10)")
    p.add_argument("--step-ms", type=float, default=10, help="latency phase: send rate*step every step (default 10 ms)")
    p.add_argument("--mode", choices=("kafka", "rest"), default="kafka", help="offer commands as Kafka requests or REST calls")
    # 1,000 POST/s at ~100 ms a POST under load needs ~100 in flight (Little's law): 64 made the
    # client, not intake, the limit.
    p.add_argument("--concurrency", type=int, default=256, help="REST mode: requests in flight at most (default 256)")
    p.add_argument("--window", type=int, default=10_000, help="window phase: inverters in one window (default 10,000; 0 skips)")
    p.add_argument("--window-lead", type=float, default=15, help="window phase: startAt this many s after the first request (default 15)")
    p.add_argument("--window-length", type=float, default=10, help="window phase: endAt - startAt, s (default 10)")
    p.add_argument("--mix", type=fleetgen.parse_mix, default={},
                   help="entities on other backends, e.g. 'ocpp=500,sunspec-modbus=200,ev-aggregator=500,native-window=500' (the rest: vendor-cloud)")
    p.add_argument("--faults", type=float, default=0.0, help="share of simulator calls with an injected fault (default 0)")
    p.add_argument("--relay", choices=relay.KINDS, default="aiokafka", help="bare relay hops: aiokafka getmany or faust take()")
    p.add_argument("--relay-records", type=int, default=None, help="records through the relay (default: the burst size)")
    p.add_argument("--skip-relay", action="store_true")
    p.add_argument("--fleet-load", type=int, default=100_000, help="entities of the fleet-loading figure (default 100,000; 0 skips it)")
    p.add_argument("--redis-entities", type=int, default=10_000, help="entities for the Redis memory figure (0 skips it)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12",
                   help="the stack's Redis database, flushed first (default redis://127.0.0.1:6379/12)")
    p.add_argument("--redis-mem-db", type=int, default=11, help="database on that server for the memory figure, flushed")
    p.add_argument("--database-url", default=None,
                   help="the ledger (default: a new SQLite file in the work dir; a PostgreSQL URL to measure that)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for a phase's commands to end (default 300)")
    p.add_argument("--work-dir", type=Path, default=None, help="fleet, ledger and logs (default: a new temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.burst is None:
        args.burst = args.entities
    if args.relay_records is None:
        args.relay_records = args.burst
    return args


def _db_url(url: str, db: int) -> str:
    return urlunparse(urlparse(url)._replace(path=f"/{db}"))


def _stack(args: argparse.Namespace, work: Path) -> Stack:
    env = isolated_env(
        redis_url=args.redis_url,
        database_url=args.database_url or f"sqlite:///{work}/ledger.sqlite3",
        fleet_file=work / "fleet.yaml",
        cooldown_s="0",  # so the latency phase can command the burst's entities again
        # The figures are for commands: the inverters' periodic reports (10,000 of them for the
        # window phase) would load the stack beside them. The extra report after a window's
        # start and end is still asked and published.
        sim_report_interval_s="0",
        # Under injected faults, results the simulator lost are found by the sweeper's delivery
        # checks: sooner than the default 2 minutes, so the run ends sooner.
        **({"deadline_sent_s": "15", "sweep_interval_s": "2"} if args.faults > 0 else {}),
    )
    return Stack(env=env, log_dir=work / "logs")


def _latencies(offered: Offered, at: dict[str, float]) -> list[float]:
    return [at[c] - t for c, t in offered.produced_at.items() if c in at]


def _summarise_commands(offered: Offered, watcher: StatusWatcher) -> dict[str, Any]:
    statuses = Counter(watcher.terminal[c][0] for c in offered.produced_at if c in watcher.terminal)
    ends = [watcher.terminal[c][1] for c in offered.produced_at if c in watcher.terminal]
    succeeded_at = {c: at for c, (s, at) in watcher.terminal.items() if s == "Succeeded"}
    to_succeeded = _latencies(offered, succeeded_at)
    out: dict[str, Any] = {
        "commands": len(offered.produced_at),
        "offer_seconds": offered.last_at - offered.first_at,
        "succeeded": statuses.pop("Succeeded", 0),
        "other_terminal": dict(statuses),
        "not_terminal": len(offered.produced_at) - len(ends),
        "last_terminal_s": (max(ends) - offered.first_at) if ends else None,
        "to_succeeded_s": {p: percentile(to_succeeded, p) for p in (50, 95, 99)},
    }
    if offered.post_latency_s or offered.post_errors:
        posts = len(offered.post_latency_s)
        out["post"] = {
            "requests": posts + sum(offered.post_errors.values()),
            "errors": dict(offered.post_errors),
            "per_s": posts / (offered.last_at - offered.first_at) if offered.last_at > offered.first_at else None,
            "latency_s": {p: percentile(offered.post_latency_s, p) for p in (50, 99)},
        }
    return out


async def _phases(stack: Stack, args: argparse.Namespace, work: Path, ids: list[str], results: dict[str, Any]) -> None:
    bootstrap = stack.settings.kafka_bootstrap
    if args.redis_entities > 0:
        fleet = Fleet.model_validate(fleetgen.fleet(args.redis_entities))
        print(f"bench: Redis memory with {args.redis_entities:,} entities, both slots filled ...", flush=True)
        mem = await redismem.measure(_db_url(args.redis_url, args.redis_mem_db), fleet, list(fleet.entities))
        results["redis"] = vars(mem)

    if args.faults > 0:
        async with httpx.AsyncClient(base_url=stack.url("simulator"), timeout=10) as http:
            plan = {"probability": args.faults, "latencyMs": 500, "retryAfterS": 1, "hangS": 8}
            (await http.put("/sim/faults", json=plan)).raise_for_status()
        print(f"bench: the simulator injects faults on {args.faults:.0%} of calls", flush=True)
    watcher = StatusWatcher(bootstrap)
    await watcher.start()
    load: KafkaLoad | RestLoad = KafkaLoad(bootstrap) if args.mode == "kafka" else RestLoad(stack.url("intake"), args.concurrency)
    try:
        async with load:
            # -- burst
            commands = [(new_command_id("burst", i), ids[i % len(ids)]) for i in range(args.burst)]
            pids = {name: proc.pid for name, proc in stack.procs.items()} | {"bench (this process)": os.getpid()}
            print(f"bench: burst of {len(commands):,} commands ({args.mode}) ...", flush=True)
            cpu_before = procstat.snapshot(pids)
            if isinstance(load, KafkaLoad):
                offered = await load.burst(commands)
            else:
                offered = await load.burst([e for _, e in commands])
            not_terminal = await watcher.wait_terminal(list(offered.produced_at), args.timeout)
            # Every service caught up with the burst, before the CPU is read: status folds the
            # last events into the ledger after the devices are done (it lingers and trails),
            # and that work is the burst's too (read at the last terminal status, status's
            # figure was less than half of what it is).
            await _caught_up(stack, deadline_s=args.timeout)
            cpu_after = procstat.snapshot(pids)
            burst = _summarise_commands(offered, watcher)
            burst["commands_per_s"] = burst["commands"] / burst["last_terminal_s"] if burst["last_terminal_s"] else None
            if not_terminal or burst["not_terminal"]:
                missing = [c for c in offered.produced_at if c not in watcher.terminal][:5]
                print(f"bench: {burst['not_terminal']:,} burst commands not terminal after {args.timeout:.0f} s, e.g. {missing}",
                      flush=True)
            per_k = max(len(offered.produced_at), 1) / 1000
            results["burst"] = burst
            results["cpu_s_per_1000"] = {
                name: (cpu_after[name] - cpu_before[name]) / per_k for name in cpu_before if name in cpu_after
            }

            # -- latency (every service has caught up with the burst: the figure is for the
            # offered rate alone)
            n = int(args.rate * args.latency_seconds)
            if n > 0:
                await _latency(stack, args, ids, n, load, watcher, results)

            # -- window
            if args.window > 0:
                await _caught_up(stack, deadline_s=args.timeout)
                print(f"bench: window, {args.window:,} inverters, start in {args.window_lead:.0f} s ...", flush=True)
                w = await window.run(stack.url("intake"), stack.url("simulator"), fleetgen.pv_ids(args.window),
                                     args.window_lead, args.window_length, deadline_s=args.timeout)
                results["window"] = vars(w)
            got = await receipts(stack.url("simulator"))
            results["device_duplicates"] = sum(len(t) - 1 for t in got.values())
            results["untruthful"] = untruthful({c: status for c, (status, _) in watcher.terminal.items()}, got)
            results["dispatch"] = _dispatch_counts((await _save_metrics(stack, work))["dispatch"])
    finally:
        await watcher.stop()


async def _save_metrics(stack: Stack, work: Path) -> dict[str, str]:
    """Every service's /metrics as the run left them, written to the work dir for a closer look."""
    (work / "metrics").mkdir(exist_ok=True)
    texts: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        for service in ("intake", "arbitration", "dispatch", "status", "simulator"):
            texts[service] = (await http.get(f"{stack.url(service)}/metrics")).text
            (work / "metrics" / f"{service}.txt").write_text(texts[service])
    return texts


def _dispatch_counts(text: str) -> dict[str, float]:
    """What dispatch did beyond sending once: its retry, unknown-delivery and check counters."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        for family in ("dercmd_dispatch_retries_total", "dercmd_dispatch_unknown_deliveries_total",
                       "dercmd_dispatch_delivery_checks_total", "dercmd_dispatch_circuit_transitions_total"):
            if line.startswith(family + "{"):
                labels = line[len(family) + 1 : line.index("}")]
                key = family.removeprefix("dercmd_dispatch_").removesuffix("_total") + "{" + labels + "}"
                out[key] = float(line.split()[-1])
    return out


async def _latency(stack: Stack, args: argparse.Namespace, ids: list[str], n: int, load: KafkaLoad | RestLoad,
                   watcher: StatusWatcher, results: dict[str, Any]) -> None:
    commands = [(new_command_id("lat", i), ids[i % len(ids)]) for i in range(n)]
    print(f"bench: latency, {args.rate:,.0f} commands/s for {args.latency_seconds:.0f} s ...", flush=True)
    if isinstance(load, KafkaLoad):
        offered_l = await load.paced(commands, args.rate, args.step_ms / 1000)
    else:
        offered_l = await load.paced([e for _, e in commands], args.rate, args.step_ms / 1000)
    await watcher.wait_terminal(list(offered_l.produced_at), args.timeout)
    latency = _summarise_commands(offered_l, watcher)
    latency["rate_offered"] = args.rate
    spread = max(offered_l.produced_at.values(), default=0) - min(offered_l.produced_at.values(), default=0)
    latency["rate_achieved"] = (len(offered_l.produced_at) - 1) / spread if spread > 0 else None

    got = await receipts(stack.url("simulator"))
    first_receipt = {c: min(times) for c, times in got.items()}
    to_device = _latencies(offered_l, first_receipt)
    latency["to_device_s"] = {p: percentile(to_device, p) for p in (50, 95, 99)}
    latency["device_receipts"] = len(to_device)
    latency["stages_s"] = _stages(offered_l, watcher, first_receipt)
    results["latency"] = latency


#: The stages of a command's way, each from the stamp before it: produced by the bench, Pending
#: (intake took the request), Triggered (arbitration decided it), received (the simulated
#: device), Succeeded (dispatch published the device's result).
STAGES = (("produce -> Pending", None, "Pending"), ("Pending -> Triggered", "Pending", "Triggered"),
          ("Triggered -> device", "Triggered", "received"), ("device -> Succeeded", "received", "Succeeded"))


def _stages(offered: Offered, watcher: StatusWatcher, received: dict[str, float]) -> dict[str, dict[int, float | None]]:
    """p50/p95/p99 of each stage over the commands that passed every stamp (one clock: this machine's)."""
    durations: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    for command_id, produced in offered.produced_at.items():
        stamps = dict(watcher.stamps.get(command_id, {}))
        if command_id in received:
            stamps["received"] = received[command_id]
        if (end := watcher.terminal.get(command_id)) and end[0] == "Succeeded":
            stamps["Succeeded"] = end[1]
        if len(stamps) < 4:
            continue
        for name, start, stop in STAGES:
            durations[name].append(stamps[stop] - (produced if start is None else stamps[start]))
    return {name: {p: percentile(values, p) for p in (50, 95, 99)} for name, values in durations.items()}


async def _caught_up(stack: Stack, deadline_s: float) -> None:
    """Until no consumer of the stack has records waiting (``dercmd_consumer_lag_records``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    async with httpx.AsyncClient(timeout=5) as http:
        while loop.time() < end:
            lag = 0.0
            for service in ("intake", "arbitration", "dispatch", "status"):
                text = (await http.get(f"{stack.url(service)}/metrics")).text
                lag += sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("dercmd_consumer_lag_records{"))
            if lag == 0:
                return
            await asyncio.sleep(0.2)
    print("bench: the stack did not catch up with the burst; the latency phase starts anyway", flush=True)


def _outcomes(phase: dict[str, Any]) -> str:
    other = phase["other_terminal"]
    detail = f" {other}" if other else ""
    return f"{phase['succeeded']:,} / {sum(other.values()):,}{detail} / {phase['not_terminal']:,}"


def _rows(results: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str]]:
    m = results["machine"]
    rows = [
        ("machine", f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']} GB RAM, Python {m['python']}"),
        ("commit", m["commit"]),
        ("mode / fleet / ledger", f"{args.mode}, {args.entities:,} entities ({_fleet_mix(args)}), {(args.database_url or 'sqlite').split(':')[0]}"),
    ]
    if b := results.get("burst"):
        rows += [
            ("burst: commands", f"{b['commands']:,} (offered in {b['offer_seconds']:.2f} s)"),
            ("burst: commands/s end to end", per_s(b.get("commands_per_s"))),
            ("burst: Succeeded / other terminal / not terminal", _outcomes(b)),
            ("burst: produce -> Succeeded p50 / p99", f"{ms(b['to_succeeded_s'][50])} / {ms(b['to_succeeded_s'][99])}"),
        ]
        if post := b.get("post"):
            rows.append(("burst: POST/s, POST p50 / p99",
                         f"{per_s(post['per_s'])}, {ms(post['latency_s'][50])} / {ms(post['latency_s'][99])}"
                         + (f", errors {post['errors']}" if post["errors"] else "")))
    if lat := results.get("latency"):
        d, s = lat["to_device_s"], lat["to_succeeded_s"]
        rows += [
            ("latency: offered / achieved rate", f"{per_s(lat['rate_offered'])} / {per_s(lat['rate_achieved'])}, {lat['commands']:,} commands"),
            ("latency: produce -> device received p50 / p95 / p99", f"{ms(d[50])} / {ms(d[95])} / {ms(d[99])}"),
            ("latency: produce -> Succeeded p50 / p95 / p99", f"{ms(s[50])} / {ms(s[95])} / {ms(s[99])}"),
            ("latency: Succeeded / other terminal / not terminal", _outcomes(lat)),
        ]
        for stage, q in lat.get("stages_s", {}).items():
            rows.append((f"latency stage: {stage} p50 / p95 / p99", f"{ms(q[50])} / {ms(q[95])} / {ms(q[99])}"))
        if post := lat.get("post"):
            rows.append(("latency: POST/s, POST p50 / p99",
                         f"{per_s(post['per_s'])}, {ms(post['latency_s'][50])} / {ms(post['latency_s'][99])}"
                         + (f", errors {post['errors']}" if post["errors"] else "")))
    if w := results.get("window"):
        sl, rl = w["start_lateness_s"], w["revert_lateness_s"]
        rows += [
            ("window: inverters, requests posted in", f"{w['devices']:,} in {w['devices'] // 100:,} requests, {w['post_seconds']:.1f} s"
             + (f", errors {w['post_errors']}" if w["post_errors"] else "")),
            ("window: start reached the device after startAt p50 / p99 / max",
             f"{ms(sl[50])} / {ms(sl[99])} / {ms(w['start_lateness_max_s'])} ({w['started']:,} started, {w['early']} early)"),
            ("window: revert reached the device after endAt p50 / p99", f"{ms(rl[50])} / {ms(rl[99])} ({w['reverted']:,} reverted)"),
        ]
    if "device_duplicates" in results:
        rows.append(("devices that got a command twice", f"{results['device_duplicates']:,}"))
    if u := results.get("untruthful"):
        rows.append(("status disagrees with the device: Succeeded unreceived / Failed or Canceled received",
                     f"{u['succeeded_not_received']:,} / {u['failed_or_canceled_but_received']:,}"))
    for key, value in sorted(results.get("dispatch", {}).items()):
        rows.append((f"dispatch: {key}", f"{value:,.0f}"))
    if args.faults > 0:
        rows.append(("faults injected on calls", f"{args.faults:.0%} (latency, 5xx, 429, timeout after acting, dropped, lost result)"))
    if r := results.get("relay"):
        rows.append((f"bare relay ({r['kind']}, {r['hops']} hops): records/s",
                     f"{per_s(r['records_per_s'])} ({r['arrived']:,}/{r['records']:,} arrived, {r['duplicates']:,} duplicates)"))
        # The relay moves Kafka records: against REST calls the ratio would compare unlike things.
        if args.mode == "kafka" and (b := results.get("burst")) and b.get("commands_per_s") and r["records_per_s"]:
            rows.append(("dercmd / relay", f"{b['commands_per_s'] / r['records_per_s']:.3f}"))
    for name, cpu in results.get("cpu_s_per_1000", {}).items():
        rows.append((f"CPU s per 1,000 commands (burst): {name}", f"{cpu:.2f}"))
    if f := results.get("fleet_load"):
        rows.append((f"fleet file of {f['entities']:,} entities ({f['file_mb']:.1f} MB): load s, MB kept / peak",
                     f"{f['seconds']:.2f} s, {f['kept_mb']:.0f} / {f['peak_mb']:.0f} MB"))
    if mem := results.get("redis"):
        rows.append(("Redis bytes per entity, both slots filled",
                     f"{mem['bytes_per_entity']:,.0f} ({mem['entities']:,} entities, {mem['keys_per_entity']:.1f} keys each, {mem['outcomes']})"))
    return rows


def _fleet_mix(args: argparse.Namespace) -> str:
    shares = {"vendor-cloud": args.entities - sum(args.mix.values())} | args.mix
    return ", ".join(f"{name} {count:,}" for name, count in shares.items())


def _terminate(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dercmd-bench-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    results: dict[str, Any] = {"machine": machine(), "options": {k: str(v) for k, v in vars(args).items()}}
    print(f"bench: work dir {work} (fleet, ledger, logs, each service's metrics at the end)", flush=True)
    ids = fleetgen.write(work / "fleet.yaml", args.entities, pv=args.window, mix=args.mix)
    if args.fleet_load > 0:
        print(f"bench: loading a fleet file of {args.fleet_load:,} entities in a new process ...", flush=True)
        results["fleet_load"] = fleetload.measure(work, args.fleet_load)
    try:
        redis.Redis.from_url(args.redis_url).flushdb()
    except redis.ConnectionError:
        pass  # the launcher starts a local redis-server, empty
    started = time.monotonic()
    stack = _stack(args, work)
    try:
        print("bench: starting the stack ...", flush=True)
        with stack:
            asyncio.run(_phases(stack, args, work, ids, results))
            if not args.skip_relay:
                print(f"bench: bare relay ({args.relay}), {args.relay_records:,} records ...", flush=True)
                r = relay.run(stack.settings.kafka_bootstrap, stack.settings.topic_partitions, args.relay_records,
                              args.relay, work, deadline_s=args.timeout)
                results["relay"] = vars(r) | {"records_per_s": r.records_per_s}
    except KeyboardInterrupt:
        print("\nbench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (LaunchError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    results["wall_seconds"] = time.monotonic() - started
    print("\n" + table(_rows(results, args)))
    print("\nIndicative figures: they depend on this machine and on what else ran on it.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"bench: results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
