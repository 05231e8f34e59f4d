"""Saving and restoring the kernel's user namespace (session.pause / resume / fork). Sandbox side only.

The host runs `_save_state(nonce)` and `_restore_state(nonce)` as silent cells and reads the one line they print,
`WORKBENCH-STATE <nonce> <json>`. Values are written with cloudpickle into `/workspace/.state/namespace.pkl` in one
pickle, so that two names for one object stay one object, and functions and classes defined in cells travel by
value. A value that cannot be pickled (a generator, an open file, a socket, a lock) is left out and named, with
the reason, in the report; modules are kept as their names and imported again.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import re
import time
import types

STATE_DIR = "/workspace/.state"
SNAPSHOT = "namespace.pkl"
MANIFEST = "manifest.json"
VERSION = 1
_MARK = "WORKBENCH-STATE"
_IPYTHON_NAMES = re.compile(r"^(_+|_i+|_i\d+|_\d+|_oh|_ih|_dh|__\w+__|In|Out|exit|quit|get_ipython)$")
_baseline = {}  # name -> id of what the start-up put into the namespace (run_tool, tables, ...)


class _Discard:
    """A file that keeps nothing: pickling into it tells whether a value pickles, without holding its bytes."""

    def write(self, data):
        return len(data)


def _shell():
    from IPython import get_ipython

    return get_ipython()


def mark_baseline():
    """Remember what the start-up defined: it is not the user's, so it is not saved."""
    _baseline.update({name: id(value) for name, value in _shell().user_ns.items()})


def _user_values(namespace):
    hidden = _shell().user_ns_hidden
    for name, value in namespace.items():
        if _IPYTHON_NAMES.match(name) or (name in hidden and hidden[name] is value):
            continue
        if _baseline.get(name) == id(value):
            continue
        yield name, value


def _why(value, exc):
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(value).__name__}: {type(exc).__name__}: {text}"[:300]


def _dump(values, path):
    import cloudpickle

    with open(path, "wb") as out:
        cloudpickle.dump(values, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()
        os.fsync(out.fileno())


def _save(directory):
    import cloudpickle

    namespace = _shell().user_ns
    modules, values, skipped = {}, {}, {}
    for name, value in _user_values(namespace):
        if isinstance(value, types.ModuleType):
            modules[name] = value.__name__
        else:
            values[name] = value
    os.makedirs(directory, exist_ok=True)
    final, partial = os.path.join(directory, SNAPSHOT), os.path.join(directory, f".{SNAPSHOT}.partial")
    try:
        try:
            _dump(values, partial)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise TypeError(str(exc)) from exc  # a value's own pickling failed: find which one below
        except Exception:
            for name in list(values):
                try:
                    cloudpickle.dump(values[name], _Discard(), protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as exc:
                    skipped[name] = _why(values.pop(name), exc)
            _dump(values, partial)
        size = os.path.getsize(partial)
        os.replace(partial, final)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    manifest = {"version": VERSION, "saved_at": time.time(), "names": sorted(values), "modules": modules,
                "skipped": skipped, "bytes": size}
    with open(os.path.join(directory, f".{MANIFEST}.partial"), "w") as out:
        json.dump(manifest, out)
    os.replace(os.path.join(directory, f".{MANIFEST}.partial"), os.path.join(directory, MANIFEST))
    return manifest


def _restore(directory):
    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise ValueError(f"the snapshot's manifest is not version {VERSION}")
    with open(os.path.join(directory, SNAPSHOT), "rb") as f:
        values = pickle.load(f)  # cloudpickle's output is plain pickle; cloudpickle is imported as it needs
    if not isinstance(values, dict):
        raise ValueError("the snapshot does not hold a namespace")
    namespace = _shell().user_ns
    failed = {}
    for name, module in (manifest.get("modules") or {}).items():
        try:
            namespace[name] = importlib.import_module(module)
        except Exception as exc:
            failed[name] = f"module {module}: {type(exc).__name__}: {exc}"[:300]
    namespace.update(values)
    return {"names": sorted(values) + sorted(set(manifest.get("modules") or {}) - set(failed)),
            "skipped": {**(manifest.get("skipped") or {}), **failed}, "bytes": manifest.get("bytes", 0)}


def _report(nonce, action, directory):
    try:
        report = {"ok": True, **action(directory)}
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        report = {"ok": False, "full": full, "error": f"{type(exc).__name__}: {exc}"[:1000]}
    except BaseException as exc:  # an interrupt too: the host hears what happened
        report = {"ok": False, "full": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}
    print(f"{_MARK} {nonce} {json.dumps(report)}", flush=True)


def _save_state(nonce, directory=STATE_DIR):
    _report(nonce, _save, directory)


def _restore_state(nonce, directory=STATE_DIR):
    _report(nonce, _restore, directory)
