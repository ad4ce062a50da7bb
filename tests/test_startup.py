"""posttrain's bytecode cache where the environment turned Python's off (posttrain.startup)."""

import marshal
import os
import py_compile
import subprocess
import sys
from importlib.util import MAGIC_NUMBER
from pathlib import Path

# Timestamp bytecode in __pycache__ beside the source, as wheels ship it, whatever an earlier test left
# set in this process (SOURCE_DATE_EPOCH makes py_compile write hash-checked files; an in-process
# ``main`` sets sys.pycache_prefix, which moves py_compile's default output).
TIMESTAMP = py_compile.PycInvalidationMode.TIMESTAMP
SRC = Path(__file__).resolve().parents[1] / "src"
PROBE = ("from posttrain.startup import enable_bytecode_cache; print(enable_bytecode_cache()); "
         "import fresh, beside, stale; print(fresh.X, beside.X, stale.X)")


def _beside_pyc(mods: Path, name: str) -> str:
    """Where a wheel ships ``name``'s bytecode (importlib's cache_from_source follows sys.pycache_prefix)."""
    return str(mods / "__pycache__" / f"{name}.{sys.implementation.cache_tag}.pyc")


def _run(tmp_path, **env):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{tmp_path / 'mods'}", "POSTTRAIN_HOME": str(tmp_path / "home"),
           "PYTHONDONTWRITEBYTECODE": "1", **env}
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return r.stdout.split("\n")[:2]


def _timestamp_pyc(code_text: str, source: Path) -> bytes:
    st = source.stat()
    header = MAGIC_NUMBER + (0).to_bytes(4, "little") + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
    return header + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little") + marshal.dumps(compile(code_text, str(source), "exec"))


def test_bytecode_is_read_beside_the_source_else_cached_by_posttrain(tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "fresh.py").write_text("X = 1\n")
    (mods / "beside.py").write_text("X = 2\n")
    py_compile.compile(str(mods / "beside.py"), _beside_pyc(mods, "beside"), invalidation_mode=TIMESTAMP)  # shipped with its bytecode
    (mods / "stale.py").write_text("X = 3\n")
    py_compile.compile(str(mods / "stale.py"), _beside_pyc(mods, "stale"), invalidation_mode=TIMESTAMP)
    (mods / "stale.py").write_text("X = 33\n")  # its bytecode beside it is now out of date
    os.utime(mods / "stale.py", (1_700_000_000, 1_700_000_000))

    folder, values = _run(tmp_path)
    cache = tmp_path / "home" / "pycache"
    assert folder == str(cache)
    assert values == "1 2 33"
    cached = {p.name.split(".")[0]: p for p in cache.rglob("*.pyc") if p.parent.name == "mods"}
    assert sorted(cached) == ["fresh", "stale"]  # compiled here: cached; shipped and current: read in place
    assert sorted(p.name.split(".")[0] for p in (mods / "__pycache__").iterdir()) == ["beside", "stale"]  # nothing new

    # A second process reads the cache: a cached file with other code and the source's stamp proves it.
    cached["fresh"].write_bytes(_timestamp_pyc("X = 111", mods / "fresh.py"))
    cached["stale"].write_bytes(_timestamp_pyc("X = 333", mods / "stale.py"))
    assert _run(tmp_path) == [str(cache), "111 2 333"]


def test_bytecode_cache_stays_off_where_python_writes_its_own_or_the_user_says_so(tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    for name in ("fresh", "beside", "stale"):
        (mods / f"{name}.py").write_text("X = 0\n")
    assert _run(tmp_path, POSTTRAIN_BYTECODE_CACHE="0") == ["None", "0 0 0"]
    assert not (tmp_path / "home").exists()
    assert not (mods / "__pycache__").exists()  # the environment's choice holds
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                       env={**env, "PYTHONPATH": f"{SRC}{os.pathsep}{mods}", "POSTTRAIN_HOME": str(tmp_path / "home")})
    assert r.stdout.split("\n")[:2] == ["None", "0 0 0"]
    assert not (tmp_path / "home").exists()
