"""Host and QEMU capability probe (the data behind ``coco-shim check``).

Host facts come from sysfs and device nodes; whether KVM can actually run a guest comes from
a real, bounded boot attempt (a device node can exist on hosts where every guest aborts).
QEMU facts come from QMP on a ``-machine none`` instance: version, TEE object types and their
properties, SEV capabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hypervisor.choice import accelerator_for, vsock_kind
from hypervisor.errors import ProbeError, QemuError
from hypervisor.monitor import QmpMonitor
from hypervisor.profile import RuntimeProfile, TeeKind, VmInstance, confidential_object
from hypervisor.timeouts import TIMEOUTS, Timeouts

log = logging.getLogger(__name__)

TEE_TYPES = ("sev-guest", "sev-snp-guest", "tdx-guest", "s390-pv-guest", "pef-guest")


@dataclass(frozen=True)
class Fact:
    ok: bool
    detail: str


def _flag(path: Path) -> Fact:
    try:
        value = path.read_text().strip()
    except OSError:
        return Fact(False, f"{path} absent")
    return Fact(value in ("Y", "y", "1"), f"{path} = {value}")


def _node(path: Path) -> Fact:
    return Fact(path.exists(), f"{path} {'present' if path.exists() else 'absent'}")


@dataclass(frozen=True)
class HostCapabilities:
    kvm_device: Fact
    sev: Fact
    sev_es: Fact
    snp: Fact
    sev_device: Fact
    tdx: Fact
    s390_pv: Fact
    pef: Fact
    vhost_vsock: Fact
    vhost_net: Fact

    def tee(self, kind: TeeKind) -> Fact:
        return {
            TeeKind.NONE: Fact(True, "no TEE needed"),
            TeeKind.SEV: self._both(self.sev, self.sev_device),
            TeeKind.SEV_ES: self._both(self.sev_es, self.sev_device),
            TeeKind.SNP: self._both(self.snp, self.sev_device),
            TeeKind.TDX: self.tdx,
            TeeKind.S390_PV: self.s390_pv,
            TeeKind.PEF: self.pef,
        }[kind]

    @staticmethod
    def _both(a: Fact, b: Fact) -> Fact:
        return Fact(a.ok and b.ok, f"{a.detail}; {b.detail}")


def probe_host(root: Path = Path("/")) -> HostCapabilities:
    """Read sysfs and /dev under ``root`` (a test may point this at a fake tree)."""
    amd = root / "sys/module/kvm_amd/parameters"
    ultravisor = root / "sys/firmware/ultravisor"
    return HostCapabilities(
        kvm_device=_node(root / "dev/kvm"),
        sev=_flag(amd / "sev"),
        sev_es=_flag(amd / "sev_es"),
        snp=_flag(amd / "sev_snp"),
        sev_device=_node(root / "dev/sev"),
        tdx=_flag(root / "sys/module/kvm_intel/parameters/tdx"),
        s390_pv=_flag(root / "sys/firmware/uv/prot_virt_host"),
        pef=Fact(ultravisor.is_dir(),
                 f"{ultravisor} {'present' if ultravisor.is_dir() else 'absent'}"),
        vhost_vsock=_node(root / "dev/vhost-vsock"),
        vhost_net=_node(root / "dev/vhost-net"),
    )


@dataclass(frozen=True)
class QemuCapabilities:
    binary: str
    version: str
    tee_types: dict[str, list[str] | None]  # type -> its properties, None if absent
    sev_capabilities: dict[str, Any] | None
    sev_capabilities_error: str | None

    def has(self, qom_type: str | None) -> bool:
        return qom_type is None or self.tee_types.get(qom_type) is not None


async def _run_none_machine(argv_prefix: Sequence[str], binary: str, work: Path,
                            qmp_inside: Path, extra: Sequence[str] = ()
                            ) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv_prefix, binary, "-machine", "none", "-nodefaults", "-display", "none",
        *extra, "-qmp", f"unix:{qmp_inside},server=on,wait=off",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)


async def _reap(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    _, err = await proc.communicate()
    return err or b""


def _work_dir(qemu_root: Path) -> tuple[Path, Path]:
    """A private directory reachable by QEMU (inside its root) and by us."""
    base = qemu_root / "tmp" if qemu_root != Path("/") else None
    import tempfile  # only the KVM boot probe needs it; the shim daemon imports this module

    host = Path(tempfile.mkdtemp(prefix="coco-probe-", dir=base))
    inside = Path("/") / host.relative_to(qemu_root) if base is not None else host
    return host, inside


async def probe_qemu(binary: Path, *, qemu_root: Path = Path("/"),
                     accel: str = "tcg") -> QemuCapabilities:
    """Ask a ``-machine none`` QEMU about versions, TEE types and SEV capabilities.

    ``query-sev-capabilities`` only answers under ``accel="kvm"`` on an SEV host.
    """
    prefix: tuple[str, ...] = () if qemu_root == Path("/") else ("chroot", str(qemu_root))
    host, inside = _work_dir(qemu_root)
    proc = await _run_none_machine(prefix, str(binary), host, inside / "qmp.sock",
                                   ("-accel", accel))
    monitor = QmpMonitor("probe")
    try:
        async with asyncio.timeout(TIMEOUTS.probe):
            while not (host / "qmp.sock").exists():
                if proc.returncode is not None:
                    err = await _reap(proc)
                    raise ProbeError(f"{binary} exited: {err.decode(errors='replace').strip()}")
                await asyncio.sleep(0.02)
            if not await monitor.connect_unless_exited(host / "qmp.sock", proc):
                err = await _reap(proc)
                raise ProbeError(f"{binary} exited: {err.decode(errors='replace').strip()}")
            ver = await monitor.execute("query-version")
            q = ver["qemu"]
            version = f"{q['major']}.{q['minor']}.{q['micro']}"
            types = {t["name"] for t in await monitor.execute("qom-list-types")}
            tee_types: dict[str, list[str] | None] = {}
            for t in TEE_TYPES:
                if t in types:
                    props = await monitor.execute("qom-list-properties", {"typename": t})
                    tee_types[t] = sorted(p["name"] for p in props)
                else:
                    tee_types[t] = None
            sev_caps: dict[str, Any] | None = None
            sev_err: str | None = None
            try:
                sev_caps = await monitor.execute("query-sev-capabilities")
            except QemuError as err:
                sev_err = str(err).split(": ", 2)[-1]
    except TimeoutError as err:
        raise ProbeError(f"{binary} did not answer QMP within {TIMEOUTS.probe}s") from err
    finally:
        await monitor.close()
        await _reap(proc)
        shutil.rmtree(host, ignore_errors=True)
    return QemuCapabilities(str(binary), version, tee_types, sev_caps, sev_err)


async def probe_kvm(binary: Path, *, qemu_root: Path = Path("/"),
                    bound: float = TIMEOUTS.kvm_probe_boot) -> Fact:
    """Can KVM run a guest here? Boot SeaBIOS with ``-accel kvm -cpu host`` for a moment.

    Success means the firmware printed to the debug console within ``bound`` seconds; an
    abort (e.g. ``failed to set MSR``), an error or silence means KVM is not usable.
    Callers check ``HostCapabilities.kvm_device`` first.
    """
    prefix: tuple[str, ...] = () if qemu_root == Path("/") else ("chroot", str(qemu_root))
    host, inside = _work_dir(qemu_root)
    log = host / "debugcon.log"
    proc = await asyncio.create_subprocess_exec(
        *prefix, str(binary), "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "64",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-chardev", f"file,id=dbg,path={inside / 'debugcon.log'}",
        "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        while loop.time() < deadline and proc.returncode is None:
            with contextlib.suppress(OSError):
                if b"SeaBIOS" in log.read_bytes() and b"\n" in log.read_bytes()[20:]:
                    await asyncio.sleep(0.3)  # still alive a moment after firmware start?
                    if proc.returncode is None:
                        return Fact(True, f"SeaBIOS ran under -accel kvm -cpu host ({binary})")
            await asyncio.sleep(0.05)
        err = (await _reap(proc)).decode(errors="replace").strip()
        if proc.returncode is not None and err:
            first = next((line for line in err.splitlines() if "error" in line.lower()),
                         err.splitlines()[0])
            return Fact(False, f"QEMU failed under -accel kvm: {first.strip()}")
        return Fact(False, f"no firmware output within {bound}s under -accel kvm")
    finally:
        await _reap(proc)
        shutil.rmtree(host, ignore_errors=True)


async def sev_geometry(binary: Path, *, qemu_root: Path = Path("/")) -> tuple[int, int]:
    """(cbitpos, reduced-phys-bits) from ``query-sev-capabilities`` under KVM."""
    try:
        caps = await probe_qemu(binary, qemu_root=qemu_root, accel="kvm")
    except ProbeError as err:
        raise ProbeError(f"query-sev-capabilities: {err}") from err
    if caps.sev_capabilities is None:
        raise ProbeError(f"query-sev-capabilities: {caps.sev_capabilities_error}")
    return (int(caps.sev_capabilities["cbitpos"]),
            int(caps.sev_capabilities["reduced-phys-bits"]))


@dataclass(frozen=True)
class Verdict:
    ok: bool
    accel: str
    vsock: str
    problems: list[str]


def emitted_tee_properties(profile: RuntimeProfile) -> set[str]:
    """Property names the profile's confidential-guest object will be given."""
    obj = confidential_object(profile, VmInstance(run_dir=Path("/run/probe"),
                                                   sev_cbitpos=0, sev_reduced_phys_bits=0))
    if obj is None:
        return set()
    value = obj.to_argv()[1]
    if value.startswith("{"):
        return set(json.loads(value)) - {"qom-type", "id"}
    return {pair.split("=", 1)[0] for pair in value.split(",")[1:]} - {"id"}


def assess(profile: RuntimeProfile, host: HostCapabilities, qemu: QemuCapabilities | None,
           kvm: Fact, hybrid_backend: Path | None) -> Verdict:
    """Can ``profile`` run on this host, and with which accelerator and vsock?"""
    problems: list[str] = []
    tee = profile.tee
    accel = "kvm" if tee.confidential else accelerator_for(profile.accel, kvm_usable=kvm.ok)
    if accel == "kvm" and not kvm.ok:
        problems.append(f"needs KVM: {kvm.detail}")
    fact = host.tee(tee)
    if not fact.ok:
        problems.append(f"host lacks {tee.value}: {fact.detail}")
    if qemu is None:
        problems.append(f"QEMU {profile.qemu} could not be probed")
    elif not qemu.has(tee.qom_type):
        problems.append(f"QEMU {qemu.version} has no {tee.qom_type} object type")
    elif tee.qom_type is not None:
        missing = emitted_tee_properties(profile) - set(qemu.tee_types[tee.qom_type] or ())
        if missing:
            problems.append(f"QEMU {qemu.version} {tee.qom_type} lacks {sorted(missing)}")
    vsock = vsock_kind(profile.vsock, confidential=tee.confidential,
                       kernel_vsock=host.vhost_vsock.ok)
    if vsock == "kernel" and not host.vhost_vsock.ok:
        problems.append(f"kernel vsock: {host.vhost_vsock.detail}")
    if vsock == "hybrid" and hybrid_backend is None:
        problems.append("hybrid vsock: vhost-device-vsock not found")
    if vsock == "none":
        problems.append("no vsock: the guest agent would be unreachable")
    return Verdict(not problems, accel, vsock, problems)


def to_jsonable(obj: object) -> object:
    """Dataclass trees → plain JSON values."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}  # type: ignore[call-overload]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def which_vhost_device_vsock(explicit: str | None = None) -> Path | None:
    candidates = [explicit, os.environ.get("COCO_VHOST_DEVICE_VSOCK"),
                  shutil.which("vhost-device-vsock")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


# --- what "auto" is here, with a real probe -------------------------------------------------

KVM_DEVICE = Path("/dev/kvm")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


async def resolve_accelerator(profile: RuntimeProfile, *, cache: Path | None = None,
                              kvm_device: Path = KVM_DEVICE,
                              timeouts: Timeouts = TIMEOUTS) -> str:
    """The accelerator ``profile`` gets here; ``auto`` costs a probe boot (≤ the table's
    ``kvm_probe_boot``) unless ``cache`` holds the answer for this QEMU and this host boot."""
    if profile.accel != "auto":
        return profile.accel
    key = _cache_key(profile) if cache is not None else ""
    cached = _cached(cache, key)
    if cached is not None:
        return cached
    usable = _exists(kvm_device) and (await probe_kvm(
        profile.qemu, qemu_root=profile.qemu_root, bound=timeouts.kvm_probe_boot)).ok
    accel = accelerator_for("auto", kvm_usable=usable)
    _remember(cache, key, accel)
    log.info("accelerator auto → %s", accel)
    return accel


def _exists(path: Path) -> bool:
    return path.exists()


def _cache_key(profile: RuntimeProfile) -> str:
    return f"{profile.qemu}:{profile.qemu.stat().st_mtime_ns}:{_boot_id()}"


def _cached(cache: Path | None, key: str) -> str | None:
    if cache is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(cache.read_text())
        if record.get("key") == key:
            return str(record["accel"])
    return None


def _remember(cache: Path | None, key: str, accel: str) -> None:
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "accel": accel}))


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""
