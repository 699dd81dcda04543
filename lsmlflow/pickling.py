"""Hooks to the wire: a function becomes base64 of ``cloudpickle.dumps`` (what the dagshub client sends),
with every module of the user's own pickled by value, because the server cannot import them.

cloudpickle pickles a function of an importable module by reference (``mymodule.post``): on the
server that is an ImportError, the most common first failure. Modules that live outside the
standard library and site-packages (the user's files, a notebook, an editable install) are pickled
by value here; the product's ``hooks`` package is on every server and is sent by reference.
Bytecode does not survive a change of Python minor version, and cloudpickle's format changes with
its major version: both are checked against the server's before anything is sent.
"""

from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import platform
import sys
import sysconfig
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cloudpickle

from .errors import HookNotPortable

# This distribution's packages, which every server has: hooks from ``hooks`` go by reference
# ("hooks.pre:read_texts"), readable on /health; nothing of the others is pickled by value.
SERVER_PACKAGES = ("hooks", "backend", "lsmlflow", "orchestrator")
_OUR_ROOT = Path(__file__).resolve().parents[1]
_registry_lock = threading.Lock()


def runtime_versions() -> dict[str, str]:
    """This interpreter's Python and cloudpickle, as the server reports its own on /health."""
    return {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__}


def check_portable(server: Mapping[str, Any] | None, where: str) -> None:
    """Raise HookNotPortable when a pickled function made here would not run on ``server``'s runtime
    (its ``runtime`` from /health); no check when the server does not say (an older server)."""
    if not server or not server.get("python"):
        return
    here = runtime_versions()
    minor = lambda version: ".".join(str(version).split(".")[:2])
    major = lambda version: str(version).split(".")[0]
    if minor(server["python"]) != minor(here["python"]):
        raise HookNotPortable(
            f"{where} runs Python {server['python']} and this client Python {here['python']}: pickled hooks "
            "carry bytecode of one Python minor version",
            f"Run the client with Python {minor(server['python'])}, or install the hooks' module where the server "
            "runs and pass them as 'module:function' strings.",
        )
    if server.get("cloudpickle") and major(server["cloudpickle"]) != major(here["cloudpickle"]):
        raise HookNotPortable(
            f"{where} has cloudpickle {server['cloudpickle']} and this client {here['cloudpickle']}",
            f"Install cloudpickle {major(server['cloudpickle'])}.x here (pip install 'cloudpickle=="
            f"{major(server['cloudpickle'])}.*'), or pass the hooks as 'module:function' strings.",
        )


@functools.lru_cache(maxsize=1)
def _system_paths() -> tuple[Path, ...]:
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    paths = {Path(p).resolve() for key in keys if (p := sysconfig.get_paths().get(key))}
    paths.update(Path(p).resolve() for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")))
    return tuple(paths)


def _origin(name: str) -> Path | None:
    origin = getattr(sys.modules.get(name), "__file__", None)
    return Path(origin).resolve() if origin else None


def _is_ours(top: str) -> bool:
    """One of this distribution's packages, from where this client itself is installed (a user's own
    ``hooks.py`` is not ours)."""
    origin = _origin(top)
    return top in SERVER_PACKAGES and origin is not None and origin.is_relative_to(_OUR_ROOT)


def is_users_module(name: str) -> bool:
    """A module the server cannot be assumed to have: judged by its top-level package, which is not
    built in, not in the standard library or site-packages, and not one of this distribution's."""
    if name == "__main__":
        return True
    top = name.partition(".")[0]
    if top in sys.builtin_module_names or top in sys.stdlib_module_names or _is_ours(top):
        return False
    origin = _origin(top)
    if origin is None:
        return False  # namespace packages and the like: nothing of ours to pickle
    return not any(origin.is_relative_to(path) for path in _system_paths())


def users_modules() -> list[str]:
    """The top-level names of the user's modules now imported (``tests``, ``myhooks``...)."""
    tops = {name.partition(".")[0] for name in list(sys.modules) if name != "__main__"}
    return sorted(top for top in tops if top in sys.modules and is_users_module(top))


def reference_of(fn: Callable[..., Any]) -> str | None:
    """``module:function`` for a top-level function of a server package, which the server imports itself."""
    module, qualname = getattr(fn, "__module__", ""), getattr(fn, "__qualname__", "")
    if not module or module.partition(".")[0] != "hooks" or not _is_ours("hooks") or "<" in qualname or "." in qualname:
        return None
    return f"{module}:{qualname}" if getattr(sys.modules.get(module), qualname, None) is fn else None


def encode_hook(hook: Callable[..., Any] | str | None, role: str = "hook") -> str:
    """A hook as a configure body carries it: ``""`` (identity), a ``module:function`` string as given,
    or base64 cloudpickle with the user's modules pickled by value."""
    if hook is None or hook == "":
        return ""
    if isinstance(hook, str):
        return hook
    if not callable(hook):
        raise HookNotPortable(f"{role} must be a function or a 'module:function' string", f"got {type(hook).__name__}")
    reference = reference_of(hook)
    if reference:
        return reference
    with _registry_lock:
        already = set(cloudpickle.list_registry_pickle_by_value())
        added = [name for name in users_modules() if name not in already and name in sys.modules]
        for name in added:
            cloudpickle.register_pickle_by_value(sys.modules[name])
        try:
            payload = cloudpickle.dumps(hook)
        except Exception as exc:
            raise HookNotPortable(
                f"{role} cannot be pickled: {type(exc).__name__}: {exc}",
                "A hook must not hold open files, locks, sockets or loaded models in its closure or globals; "
                "open or load them inside the function.",
            ) from exc
        finally:
            for name in added:
                cloudpickle.unregister_pickle_by_value(sys.modules[name])
    return base64.b64encode(payload).decode()


def load_reference(reference: str, role: str = "hook") -> Callable[..., Any]:
    """``module:function`` or ``path/to/file.py:function``, imported from local files (the current folder
    first), for the CLI; the function is then pickled by value."""
    target, sep, attribute = reference.rpartition(":")
    if not sep or not target or not attribute:
        raise HookNotPortable(f"{role} {reference!r} is not 'module:function'", "e.g. --post-hook myhooks:post")
    if target.endswith(".py") or "/" in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise HookNotPortable(f"{role}: no file {target!r}", "Give a path to a .py file, relative to here.")
        name = path.stem
        taken = _origin(name) if name in sys.modules else None
        if name in sys.modules and taken != path:  # a user's hooks.py must not replace our hooks package
            name = f"lsmlflow_user_{name}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise HookNotPortable(f"{role}: {target!r} is not a Python file", "Give a .py file.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))  # its own imports of its neighbours
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise HookNotPortable(f"{role}: cannot import {target!r}: {exc}",
                                  "Run from the folder that holds it, or give its file: path/to/hooks.py:function.") from exc
    fn: Any = module
    for part in attribute.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise HookNotPortable(f"{role}: {target!r} has no {attribute!r}", "Check the function's name.")
    if not callable(fn):
        raise HookNotPortable(f"{role}: {reference!r} is not a function", f"it is a {type(fn).__name__}")
    return fn
