"""Redis state has one owner: :mod:`dercmd.state` (``libs/dercmd/state/``). Nothing else in
the services or the shared library names a Redis key, a hash field's command, or a Lua
script; they call the state package's modules and get typed values back.

What counts as naming state, outside ``libs/dercmd/state/``:

- a key pattern (``dercmd:{...}``, ``dercmd:name``);
- a ``.lua`` file, or a mention of one;
- running a script (``Script(``, ``EVALSHA``, ``register_script``, ``script_load``, ``.eval(``);
- a raw data command on a Redis client or pipeline (``get``, ``hset``, ``zadd``, ``incr``...);
- importing the package's key builders or script runner (``dercmd.state.keys`` gives only
  ``CALL_TIMEOUT_S`` and ``STATE_TTL_S``; ``dercmd.state.scripts`` and
  ``dercmd.state.testing`` nothing).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
STATE = ROOT / "libs" / "dercmd" / "state"
SCANNED = (ROOT / "services", ROOT / "libs" / "dercmd")

KEY = re.compile(r"dercmd:(\{|[a-z_])")
LUA = re.compile(r"\.lua\b")
SCRIPT = re.compile(r"\bScript\(|evalsha|register_script|script_load|\.eval\(", re.IGNORECASE)
#: A data command on a Redis client or pipeline (``self._redis.get(``, ``pipe.hset(``, a chained
#: ``).expire(``): a connection's own commands (``ping``, ``time``, ``info``) are not state.
_DATA = "hget|hset|hdel|hmget|hgetall|hincrby|hexists|zadd|zrem|zcard|zrange|zrangebyscore|incr|incrby|pexpire|expire|ttl"
RAW = re.compile(rf"(?:redis|pipe|pipeline|client)\.(get|set|delete|exists|mget|mset|{_DATA})\(|\)\.({_DATA})\(")
ALLOWED_FROM_KEYS = {"CALL_TIMEOUT_S", "STATE_TTL_S"}


def _sources() -> list[Path]:
    files = [p for root in SCANNED for p in root.rglob("*") if p.suffix in (".py", ".lua") and p.is_file()]
    return sorted(p for p in files if STATE not in p.parents and ".venv" not in p.parts)


def _absolute(path: Path, module: str, level: int) -> str:
    """The absolute name of a relative import in ``path`` (libs/dercmd is ``dercmd``,
    services/<name> is ``dercmd.<name>``)."""
    if not level:
        return module
    base = ROOT / "libs" / "dercmd"
    parts = ["dercmd", *path.parent.relative_to(base).parts] if path.is_relative_to(base) else \
        ["dercmd", *path.parent.relative_to(ROOT / "services").parts]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, module] if module else parts)


def _bad_imports(path: Path, text: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name in ("dercmd.state.keys", "dercmd.state.scripts", "dercmd.state.testing")]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(path, node.module or "", node.level)
            names = {a.name for a in node.names}
            if module in ("dercmd.state.scripts", "dercmd.state.testing"):
                found.append(f"from {module} import {', '.join(sorted(names))}")
            elif module == "dercmd.state.keys" and names - ALLOWED_FROM_KEYS:
                found.append(f"from {module} import {', '.join(sorted(names - ALLOWED_FROM_KEYS))}")
            elif module == "dercmd.state" and names & {"keys", "scripts", "testing"}:
                found.append(f"from dercmd.state import {', '.join(sorted(names & {'keys', 'scripts', 'testing'}))}")
    return found


def _violations(path: Path) -> list[str]:
    text = path.read_text()
    where = path.relative_to(ROOT)
    if path.suffix == ".lua":
        return [f"{where}: a Lua script outside dercmd.state"]
    out = [f"{where}:{n}: {kind}: {line.strip()}"
           for n, line in enumerate(text.splitlines(), 1)
           for kind, pattern in (("key", KEY), ("script", LUA), ("script", SCRIPT), ("raw Redis command", RAW))
           if pattern.search(line)]
    return out + [f"{where}: {imp}" for imp in _bad_imports(path, text)]


def test_the_scan_sees_the_code() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert "services/arbitration/arbiter.py" in names and "libs/dercmd/service.py" in names
    assert not any(n.startswith("libs/dercmd/state/") for n in names)


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('from dercmd.state import keys\nk = "dercmd:{e}:slots"\nawait redis.hget(k, "active")\nScript(r, "x")\n'
                      'SOURCE = "arbitrate.lua"\nfrom dercmd.state.keys import CALL_TIMEOUT_S, slots\n')
    text = sample.read_text()
    kinds = [kind for line in text.splitlines() for kind, pattern in
             (("key", KEY), ("lua", LUA), ("script", SCRIPT), ("raw", RAW)) if pattern.search(line)]
    assert sorted(kinds) == ["key", "lua", "raw", "script"]
    assert len(_bad_imports(sample, text)) == 2
    assert _absolute(ROOT / "libs" / "dercmd" / "service.py", "state.keys", 1) == "dercmd.state.keys"
    assert _absolute(ROOT / "services" / "dispatch" / "backends" / "ocpp" / "__init__.py", "base", 2) == "dercmd.dispatch.backends.base"


def test_nothing_outside_the_state_package_names_redis_state() -> None:
    problems = [v for path in _sources() for v in _violations(path)]
    assert not problems, "Redis keys, fields and scripts belong to dercmd.state:\n" + "\n".join(problems)
