"""``make bench`` (``python -m dercmd.bench``): the project's benchmark, one command for everyone.

It generates a fleet, starts the whole stack with :class:`dercmd.launcher.Stack` on free
ports (embedded broker, its own Redis database and SQLite ledger), offers load, and prints
what it measured. The figures (see :mod:`dercmd.bench.report` for each one's definition):

- burst: commands/s end to end, produce -> ``Succeeded`` p50/p99, outcome counts;
- latency at an offered rate: produce -> device received and produce -> ``Succeeded``;
- a bare relay (four aiokafka or faust hops) on the same broker, and dercmd's ratio to it;
- CPU seconds per 1,000 commands of every process during the burst;
- Redis bytes per entity with both slots filled.

Every figure depends on the machine and on whatever else runs on it: indicative, never a
pass/fail threshold (tests never assert on timing).
"""
