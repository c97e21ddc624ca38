"""The kernel's configfs-tsm report interface (Documentation/ABI/testing/configfs-tsm).

One report is one directory made under ``/sys/kernel/config/tsm/report/``: the kernel fills it
with attributes; writing ``inblob`` (at most 64 bytes of report data) and then reading
``outblob`` yields the TEE's report (SNP attestation report, TDX quote); ``auxblob`` holds the
SNP certificate table; ``provider`` names the driver (``sev_guest``, ``tdx_guest``,
``arm_cca_guest``); ``generation`` counts writes, so a reader that sees more than the writes it
made knows another process raced it on the same directory. The directory is removed (rmdir)
after use.

File access goes through four small methods so tests can emulate the kernel's side on an
ordinary directory tree (``tests/unit/guest/fake_tsm.py``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
INBLOB_MAX = 64


class TsmError(RuntimeError):
    """The configfs-tsm interface is missing or answered unexpectedly."""


class TsmReport(NamedTuple):
    provider: str  # "sev_guest", "tdx_guest", …
    outblob: bytes
    auxblob: bytes


class TsmReports:
    """Make reports through configfs-tsm under ``root``."""

    def __init__(self, root: Path = TSM_REPORT_ROOT) -> None:
        self.root = root

    def available(self) -> bool:
        return self.root.is_dir()

    # The four file operations (the kernel's side is emulated by overriding these in tests).
    def _mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700)

    def _rmdir(self, path: Path) -> None:
        path.rmdir()

    def _read(self, path: Path) -> bytes:
        return path.read_bytes()

    def _write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def provider(self) -> str:
        """The provider name, read from a fresh (and removed) report directory."""
        entry = self._enter()
        try:
            return self._provider(entry)
        finally:
            self._leave(entry)

    def report(self, report_data: bytes, *, privlevel: int | None = None) -> TsmReport:
        """The TEE report binding ``report_data`` (zero-padded to 64 bytes)."""
        if len(report_data) > INBLOB_MAX:
            raise TsmError(f"report data is {len(report_data)} bytes, at most {INBLOB_MAX}")
        entry = self._enter()
        try:
            provider = self._provider(entry)
            writes = 0
            if privlevel is not None:
                self._write(entry / "privlevel", f"{privlevel}\n".encode())
                writes += 1
            self._write(entry / "inblob", report_data.ljust(INBLOB_MAX, b"\0"))
            writes += 1
            outblob = self._read(entry / "outblob")
            try:
                auxblob = self._read(entry / "auxblob")
            except OSError:  # auxblob exists only where the provider has one (SNP)
                auxblob = b""
            generation = self._generation(entry)
            if generation != writes:
                raise TsmError(
                    f"configfs-tsm generation is {generation} after {writes} write(s): another "
                    f"process wrote to {entry}; the report cannot be trusted to be ours"
                )
            if not outblob:
                raise TsmError(f"configfs-tsm returned an empty report ({entry}/outblob)")
            return TsmReport(provider, outblob, auxblob)
        finally:
            self._leave(entry)

    def _enter(self) -> Path:
        if not self.available():
            raise TsmError(f"no configfs-tsm report interface at {self.root}")
        import secrets  # here: hmac and hashlib stay off the agent's path to listening

        entry = self.root / f"coco-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._mkdir(entry)
        except OSError as err:
            raise TsmError(f"cannot create a configfs-tsm report {entry}: {err}") from err
        return entry

    def _leave(self, entry: Path) -> None:
        # A failed rmdir must not mask the error that brought us here.
        with contextlib.suppress(OSError):
            self._rmdir(entry)

    def _provider(self, entry: Path) -> str:
        try:
            return self._read(entry / "provider").decode().strip()
        except OSError as err:
            raise TsmError(f"cannot read {entry}/provider: {err}") from err

    def _generation(self, entry: Path) -> int:
        try:
            return int(self._read(entry / "generation").decode().strip())
        except (OSError, ValueError) as err:
            raise TsmError(f"cannot read {entry}/generation: {err}") from err
