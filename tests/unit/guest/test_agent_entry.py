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
