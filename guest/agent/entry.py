"""The agent's entry in the VM (init's command line): a cheaper start-up, then the agent.

Three things make the interpreter's start-up cheaper under TCG, where every byte code counts;
none changes what the agent does once started:

- **no cyclic garbage collection during start-up** (:func:`pause_gc`): the agent's imports (to
  its AgentService) leave ≈ 38 000 tracked objects (functions, classes, dicts...); every 700
  new ones the collector scans the young ones, every 10 of those scans the older ones, growing
  with the heap, while almost nothing is garbage (≈ 500 unreachable objects at the end). The
  agent calls :func:`end_startup` once its AgentService is built (or its start-up has settled
  on failing or refusing): what start-up made is frozen (never scanned again: it lives as long
  as the agent) and collection resumes.
- **asyncio without ``ssl``** (:func:`import_asyncio_without_ssl`): asyncio imports ``ssl`` if
  it can (for TLS transports), and with it ``_ssl``, libssl and libcrypto, whose loading and
  relocation is a good part of asyncio's import time under TCG. The agent never gives asyncio
  a TLS transport: its TLS (registry pulls, the KBS) runs on http.client in worker threads. So
  asyncio is imported while ``import ssl`` fails (``sys.modules["ssl"] = None``: asyncio then
  runs without TLS transports), and ``ssl`` is importable again right after.
- **protobuf's pure-Python backend only if used** (:func:`defer_pure_python_protobuf`):
  ``descriptor_pool`` and the generated modules' ``builder`` import
  ``google.protobuf.internal.python_message`` (and with it ``text_format``, the pure-Python
  decoder, encoder and containers, ``pickle``...) at import even when upb, the C extension,
  implements every message, and then never touch it. It is registered as a lazy module
  (:class:`importlib.util.LazyLoader`): executed on its first attribute access, which only the
  pure-Python backend makes. The wire format is upb's either way.

It also marks the boot timeline (``coco-agent: interpreter up`` in the kernel log, see
:mod:`guest.agent.bootlog`) between the interpreter's own start and the agent's imports.

Only the guest's init uses this: on a host (tests, tools), importing the agent leaves the
interpreter as it is.
"""

from __future__ import annotations

import gc
import os
import sys

PURE_PYTHON_BACKEND = "google.protobuf.internal.python_message"

_gc_paused = False


def pause_gc() -> None:
    """Stop cyclic garbage collection until :func:`end_startup` (if it is on)."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def end_startup() -> None:
    """The agent's start-up is over: freeze what it made and resume collection, if
    :func:`pause_gc` paused it (a no-op otherwise, and the second time)."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def import_asyncio_without_ssl() -> None:
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return  # too late, or nothing to gain
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def defer_pure_python_protobuf() -> None:
    """Register protobuf's pure-Python message backend as a lazy module (see above).

    ``from google.protobuf.internal import python_message`` (how protobuf imports it) then
    binds the lazy module without executing it: the package's attribute is set here, so
    the import machinery finds it without touching the module. A plain ``import`` of it, or any
    attribute of it, executes it then. Nothing changes if protobuf is already in, or missing.
    """
    if PURE_PYTHON_BACKEND in sys.modules:
        return
    import importlib.util

    try:
        spec = importlib.util.find_spec(PURE_PYTHON_BACKEND)  # imports its packages only
    except ImportError:
        return
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[PURE_PYTHON_BACKEND] = module
    loader.exec_module(module)  # only arms the lazy load
    package, _, name = PURE_PYTHON_BACKEND.rpartition(".")
    setattr(sys.modules[package], name, module)


def mark_interpreter_up(kmsg: str = "/dev/kmsg") -> None:
    """The boot timeline's mark between the interpreter's own start-up and the agent's imports
    (the same line :class:`guest.agent.bootlog.BootLog` writes; that module is not imported
    yet, and os is in already)."""
    try:
        fd = os.open(kmsg, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, b"<6>coco-agent: interpreter up\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def main() -> int:
    mark_interpreter_up()
    pause_gc()
    import_asyncio_without_ssl()
    defer_pure_python_protobuf()
    from guest.agent.__main__ import main as agent_main

    try:
        return agent_main()
    finally:
        end_startup()
