"""Turn the hooks a configure call carries into callables, or say precisely why they cannot run here.

A hook arrives as base64 of ``cloudpickle.dumps(fn)`` (what the dagshub client sends) or as an import
reference ``"package.module:function"``. Pickled functions carry bytecode: one made by another Python
either fails to unpickle or, worse, unpickles and then crashes the interpreter when called (a
Python 3.12 function run by 3.11 segfaults). So after unpickling, every code object is checked
against this interpreter's opcode table before the hook is accepted.
"""

from __future__ import annotations

import base64
import binascii
import dis
import hashlib
import importlib
import inspect
import opcode
import pickletools
import platform
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from backend.core.errors import BadRequest, HookUnusable

HERE = f"Python {platform.python_version()} with cloudpickle {cloudpickle.__version__}"
# On /health, so a client can check before it sends a pickled hook (lsmlflow.pickling.check_portable).
RUNTIME = {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__}
FIX = (
    "Pickle the hook with the same Python minor version and cloudpickle 3.x as the backend, "
    "or install it where the backend runs and send it as 'package.module:function'."
)


def identity(value: Any) -> Any:
    """The default hook, as in the dagshub client."""
    return value


@dataclass(frozen=True)
class Hook:
    """A decoded hook, with what it accepts worked out once instead of per call."""

    fn: Callable[..., Any]
    source: str  # "identity", "module:function" or "pickle:<sha256 prefix>"
    accepts: frozenset[str] = field(default_factory=frozenset)

    def __call__(self, *values: Any, **available: Any) -> Any:
        kwargs = {name: available[name] for name in self.accepts if name in available}
        return self.fn(*values, **kwargs)


# inputs: what the pre hook got (file paths or texts), so a post hook can read image sizes; state: what
# the embed_hook made of each input.
OPTIONAL_ARGUMENTS = ("tasks", "context", "device", "label_config", "inputs", "state")
# An embed_hook(inputs, ...) may take these; model: the loaded model as its flavor loads it (a two-stage
# pyfunc's encoder is reached with model.predict(x, params={"stage": "embed"})).
EMBED_ARGUMENTS = ("tasks", "device", "label_config", "model")
# A train_hook(inputs, annotations, ...) may also take these (see backend/training/job.py).
TRAIN_ARGUMENTS = ("tasks", "label_config", "current_model", "params", "device")


def _accepted_keywords(fn: Callable[..., Any], optional: tuple[str, ...] = OPTIONAL_ARGUMENTS) -> frozenset[str]:
    """The optional keywords a hook takes: one-argument hooks (the DagsHub form) get none."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(optional)
    return frozenset(name for name in optional if name in params)


def decode_hook(raw: str | None, role: str, optional: tuple[str, ...] = OPTIONAL_ARGUMENTS) -> Hook:
    """Decode one hook; ``role`` ("pre_hook"/"post_hook"/"train_hook") names it in errors, ``optional``
    lists the keywords it gets when its signature takes them."""
    if raw is None or raw == "":
        return Hook(identity, "identity")
    if not isinstance(raw, str):
        raise BadRequest(f"{role} must be a string", f"got {type(raw).__name__}; send base64 cloudpickle or 'module:function'")
    if _looks_like_reference(raw):
        fn = _import_reference(raw, role)
        return Hook(fn, raw, _accepted_keywords(fn, optional))
    fn = _unpickle(raw, role)
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    return Hook(fn, f"pickle:{digest}", _accepted_keywords(fn, optional))


def _looks_like_reference(raw: str) -> bool:
    module, sep, attr = raw.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and all(
        part.isidentifier() for part in attr.split(".")
    )


def _import_reference(reference: str, role: str) -> Callable[..., Any]:
    module_name, _, attr_path = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise HookUnusable(
            f"{role} {reference!r} cannot be imported: {exc}",
            "Install the module where the backend runs (or put it on PYTHONPATH), or send the hook pickled.",
        ) from exc
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise HookUnusable(
                f"{role} {reference!r}: module {module_name!r} has no attribute {attr!r}",
                "Check the spelling of 'package.module:function'.",
            ) from None
    if not callable(target):
        raise HookUnusable(f"{role} {reference!r} is not callable", "Point it at a function.")
    return target


def _unpickle(raw: str, role: str) -> Callable[..., Any]:
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(
            f"{role} is not valid base64",
            f"{exc}. Send base64.b64encode(cloudpickle.dumps(fn)).decode(), or 'package.module:function'.",
        ) from exc
    try:
        fn = cloudpickle.loads(data)
    except Exception as exc:  # unpickling runs arbitrary reducers; any failure is the payload's
        raise HookUnusable(
            f"{role} cannot be unpickled here: {type(exc).__name__}: {exc}",
            f"{describe_pickle(data)}; this backend runs {HERE}. {FIX}",
        ) from exc
    if not callable(fn):
        raise HookUnusable(f"{role} unpickled to a {type(fn).__name__}, not a function", "Pickle the function itself.")
    problem = foreign_bytecode(fn)
    if problem:
        raise HookUnusable(
            f"{role} was compiled by another Python and would crash this one ({problem})",
            f"{describe_pickle(data)}; this backend runs {HERE}. {FIX}",
        )
    return fn


def describe_pickle(data: bytes) -> str:
    """What can be read off a pickle about who made it: cloudpickle generation, code-object layout."""
    modules: set[str] = set()
    protocol = None
    try:
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "PROTO":
                protocol = arg
            elif isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "STACK_GLOBAL", "INST"):
                modules.update(s for s in strings[-2:] if s.startswith("cloudpickle"))
        code_fields = _code_field_count(data)
    except Exception:  # noqa: BLE001 - whatever the scan trips on, the bytes are not a pickle we can read
        return "the payload is not a readable pickle"
    made_by = []
    if any(m.endswith("cloudpickle_fast") for m in modules):
        made_by.append("cloudpickle 1.x/2.x")
    elif modules:
        made_by.append("cloudpickle 3.x")
    if code_fields == 16:
        made_by.append("Python 3.8-3.10 (16-field code objects)")
    elif code_fields == 18:
        made_by.append("Python 3.11 or newer (18-field code objects)")
    if protocol is not None:
        made_by.append(f"pickle protocol {protocol}")
    return "it was made by " + ", ".join(made_by) if made_by else "its maker could not be told"


def _code_field_count(data: bytes) -> int | None:
    """How many arguments the pickle passes to types.CodeType (16 up to 3.10, 18 from 3.11)."""
    stack_marks: list[int] = []
    depth = 0
    after_codetype = False
    for op, arg, _ in pickletools.genops(data):
        if arg == "CodeType":
            after_codetype = True
        if not after_codetype:
            continue
        if op.name == "MARK":
            stack_marks.append(depth)
        elif op.name == "TUPLE" and stack_marks:
            return depth - stack_marks.pop()
        elif op.name.startswith(("BIN", "SHORT_BIN", "NONE", "NEWTRUE", "NEWFALSE", "INT", "LONG", "UNICODE", "STRING")) or op.name in ("BINGET", "LONG_BINGET", "GET", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT"):
            depth += 1
        elif op.name == "TUPLE2":
            depth -= 1
        elif op.name == "TUPLE3":
            depth -= 2
        elif op.name in ("REDUCE", "BUILD", "SETITEMS", "APPENDS", "SETITEM", "APPEND"):
            depth -= 1
    return None


_CACHE_ENTRIES: list[int] = list(getattr(opcode, "_inline_cache_entries", [0] * 256))
_CACHE_OPCODE = opcode.opmap.get("CACHE", -1)


def foreign_bytecode(fn: Callable[..., Any]) -> str | None:
    """Why ``fn``'s bytecode cannot be this interpreter's, or None when it reads cleanly.

    Walks every code object the function reaches (nested functions, comprehensions, closures):
    each opcode must exist here and be followed by exactly this interpreter's inline cache slots.
    """
    seen: set[int] = set()
    pending: list[types.CodeType] = []
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn):  # a callable object: its class's __call__
        code = getattr(type(fn).__call__, "__code__", None)
    if code is not None:
        pending.append(code)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = getattr(cell.cell_contents, "__code__", None)
        except ValueError:
            inner = None
        if inner is not None:
            pending.append(inner)
    while pending:
        code = pending.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        problem = _check_code(code)
        if problem:
            return f"{code.co_qualname if hasattr(code, 'co_qualname') else code.co_name}: {problem}"
        pending.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return None


def _check_code(code: types.CodeType) -> str | None:
    raw = code.co_code
    i = 0
    while i < len(raw):
        op = raw[i]
        if op == _CACHE_OPCODE or dis.opname[op].startswith("<"):
            return f"opcode {op} at offset {i} is not valid here"
        caches = _CACHE_ENTRIES[op] if op < len(_CACHE_ENTRIES) else 0
        for k in range(caches):
            slot = i + 2 + 2 * k
            if slot >= len(raw) or raw[slot] != _CACHE_OPCODE:
                return f"{dis.opname[op]} at offset {i} lacks this Python's inline caches"
        i += 2 + 2 * caches
    return None
