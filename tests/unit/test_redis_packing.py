"""The services' Redis connections pack commands with hiredis: byte for byte what redis-py's
own packer sends."""

from __future__ import annotations

import redis.asyncio as aioredis

from dercmd.service import _pack_with_hiredis

COMMANDS = [
    ("EVALSHA", "a" * 40, 2, "dercmd:{ev-1}:slots", "dercmd:{ev-1}:d:c1", "claim", 17, 604800, "c1", "0"),
    ("SCRIPT LOAD", "return redis.call('GET', KEYS[1])"),  # a two-word command: two arguments
    ("SET", "k", b"\x00\xffbytes", "PX", 1500),
    ("HSET", "h", "f", 2.5),
    ("SET", "k", bytearray(b"v")),
    ("SET", "k", memoryview(b"view")),
    ("GET", "ключ"),
]


def test_hiredis_packing_sends_what_redis_py_sends() -> None:
    plain = aioredis.from_url("redis://127.0.0.1:6379/0").connection_pool.make_connection()
    fast_client = aioredis.from_url("redis://127.0.0.1:6379/0")
    _pack_with_hiredis(fast_client)
    fast = fast_client.connection_pool.make_connection()
    for command in COMMANDS:
        assert b"".join(fast.pack_command(*command)) == b"".join(plain.pack_command(*command)), command
    assert b"".join(fast.pack_commands(COMMANDS)) == b"".join(plain.pack_commands(COMMANDS))
