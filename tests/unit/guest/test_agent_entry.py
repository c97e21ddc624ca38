"""guest.agent.entry: the VM's entry imports asyncio without ssl, and ssl still works after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_asyncio_comes_without_ssl_and_ssl_loads_later() -> None:
    probe = (
        "import sys\n"
        "from guest.agent.entry import import_asyncio_without_ssl\n"
        "import_asyncio_without_ssl()\n"
        "import asyncio.base_events, asyncio.selector_events, asyncio.sslproto\n"
        "assert 'ssl' not in sys.modules and '_ssl' not in sys.modules, 'ssl was loaded'\n"
        "assert asyncio.base_events.ssl is None and asyncio.sslproto.ssl is None\n"
        "async def serve():\n"
        "    import socket\n"
        "    a, b = socket.socketpair()\n"
        "    reader, writer = await asyncio.open_connection(sock=a)\n"
        "    b.sendall(b'ping')\n"
        "    assert await reader.readexactly(4) == b'ping'\n"
        "    writer.close()\n"
        "    b.close()\n"
        "asyncio.run(serve())\n"
        "import ssl\n"
        "assert ssl.create_default_context().verify_mode == ssl.CERT_REQUIRED\n"
        "from guest.agent import entry\n"
        "entry.import_asyncio_without_ssl()  # asyncio is in: nothing changes\n"
        "assert sys.modules['ssl'] is ssl\n"
    )
    subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, check=True)


def test_the_images_init_starts_the_agent_through_the_entry() -> None:
    init = (REPO / "packaging/guest-image/init").read_text()
    assert "from guest.agent.entry import main; sys.exit(main())" in init


def test_protobuf_pure_python_backend_is_deferred_and_the_wire_is_upbs() -> None:
    """With the backend deferred, the Health and AgentService descriptors load, messages encode
    and decode to the same bytes, and python_message (with text_format) was never executed;
    the pure-Python backend still loads, in full, the moment something uses it."""
    probe = (
        "import sys\n"
        "from guest.agent import entry\n"
        "entry.defer_pure_python_protobuf()\n"
        "from google.protobuf.internal import api_implementation\n"
        "from protocols.api.kata import health_pb2, agent_pb2\n"
        "assert api_implementation.Type() == 'upb', api_implementation.Type()\n"
        "wire = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)"
        ".SerializeToString()\n"
        "assert wire == b'\\x08\\x01', wire\n"
        "req = agent_pb2.CreateContainerRequest(container_id='c', exec_id='e')\n"
        "again = agent_pb2.CreateContainerRequest.FromString(req.SerializeToString())\n"
        "assert again.container_id == 'c' and again.exec_id == 'e'\n"
        "lazy = sys.modules[entry.PURE_PYTHON_BACKEND]\n"
        "assert type(lazy).__name__ == '_LazyModule', type(lazy)\n"
        "assert 'google.protobuf.text_format' not in sys.modules\n"
        "entry.defer_pure_python_protobuf()  # armed already: nothing changes\n"
        "assert sys.modules[entry.PURE_PYTHON_BACKEND] is lazy\n"
        "assert callable(lazy.GeneratedProtocolMessageType)  # first use: executed in full\n"
        "assert type(lazy).__name__ == 'module'\n"
        "assert 'google.protobuf.text_format' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, check=True,
                   env={"PYTHONPATH": _site_path()})


def test_gc_is_paused_for_start_up_only() -> None:
    """pause_gc stops collection only if it ran; end_startup freezes what start-up made and
    resumes it once; without pause_gc (the host's tests, tools) end_startup does nothing."""
    probe = (
        "import gc\n"
        "from guest.agent import entry\n"
        "entry.end_startup()\n"
        "assert gc.isenabled() and gc.get_freeze_count() == 0\n"
        "entry.pause_gc()\n"
        "assert not gc.isenabled()\n"
        "made = [[] for _ in range(1000)]\n"
        "entry.end_startup()\n"
        "assert gc.isenabled() and gc.get_freeze_count() >= 1000\n"
        "gc.disable()  # someone else's choice: end_startup leaves it alone now\n"
        "entry.end_startup()\n"
        "assert not gc.isenabled()\n"
        "gc.enable()\n"
        "gc.disable()\n"
        "entry.pause_gc()  # off already, not by us: end_startup leaves it off\n"
        "entry.end_startup()\n"
        "assert not gc.isenabled()\n"
    )
    subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, check=True)


def _site_path() -> str:
    import google.protobuf

    return str(Path(google.protobuf.__file__).resolve().parents[2])


def test_the_interpreter_mark_goes_to_the_kernel_log(tmp_path: Path) -> None:
    from guest.agent import entry

    log = tmp_path / "kmsg"
    log.write_bytes(b"")
    entry.mark_interpreter_up(str(log))
    assert log.read_bytes() == b"<6>coco-agent: interpreter up\n"
    entry.mark_interpreter_up(str(tmp_path / "missing" / "kmsg"))  # no log: nothing, no error
