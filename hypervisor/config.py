"""Runtime profiles (``firmware-configs/qemu-*.toml``) → :class:`RuntimeProfile`.

Every key is validated: an unknown key, a wrong type or a missing file is a
:class:`~hypervisor.errors.ConfigError` naming the file, the key and the value.

Paths may use ``{placeholders}`` filled from ``variables`` (``guest_image_dir`` by default
``/usr/share/coco-shim/guest``), and are checked inside ``qemu_root`` — the filesystem root
QEMU will see, ``/`` normally, a chroot in tests. Relative paths are relative to the profile
file's directory.
"""

from __future__ import annotations

import base64
import binascii
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hypervisor.cmdline import Arch, Bios, Firmware, UnixSocketAddress, VsockSocketAddress
from hypervisor.errors import ConfigError
from hypervisor.firmware import find_firmware
from hypervisor.profile import (
    RuntimeProfile,
    SevParams,
    SnpParams,
    TdxParams,
    TeeKind,
    TeeParams,
    confidential_conflicts,
    tee_safety_conflicts,
)
from hypervisor.rootimage import RootImage, RootImageError, VerityRoot, verity_file
from protocols import initdata

DEFAULT_VARIABLES: Mapping[str, str] = {"guest_image_dir": "/usr/share/coco-shim/guest"}
ACCELERATORS = ("kvm", "tcg", "auto")
VSOCK_KINDS = ("kernel", "hybrid", "auto", "none")

T = TypeVar("T")

# key -> (python type, required)
_HYPERVISOR_KEYS: dict[str, tuple[type, bool]] = {
    "tee": (str, True),
    "arch": (str, False),
    "qemu_path": (str, True),
    "kernel": (str, False),
    "initrd": (str, False),
    "image": (str, False),
    "kernel_params": (str, False),
    "machine_type": (str, False),
    "cpu_model": (str, False),
    "accelerator": (str, False),
    "vcpus": (int, False),
    "max_vcpus": (int, False),
    "memory_mib": (int, False),
    "memory_slots": (int, False),
    "max_memory_mib": (int, False),
    "firmware": (str, False),
    "firmware_feature": (str, False),
    "vsock": (str, False),
    "allow_debug": (bool, False),
    "debug_console_bytes": (int, False),
    "free_page_reporting": (bool, False),
}
_RUNTIME_KEYS: dict[str, tuple[type, bool]] = {
    "dial_timeout": (float, False),
    "enable_annotations": (list, False),
    "initdata": (str, False),
    "allow_unbound_initdata": (bool, False),
    "confidential": (bool, False),
    "static_sandbox_resource_mgmt": (bool, False),
    "sandbox_max_vcpus": (int, False),
    "sandbox_max_memory_mib": (int, False),
    "boot_slots": (int, False),
}
_SEV_KEYS: dict[str, tuple[type, bool]] = {
    "policy": (int, False),
    "cbitpos": (int, False),
    "reduced_phys_bits": (int, False),
    "kernel_hashes": (bool, False),
    "legacy_vm_type": (bool, False),
}
_SNP_KEYS: dict[str, tuple[type, bool]] = {
    "policy": (int, False),
    "cbitpos": (int, False),
    "reduced_phys_bits": (int, False),
    "kernel_hashes": (bool, False),
    "host_data": (str, False),
    "id_block": (str, False),
    "id_auth": (str, False),
    "author_key_enabled": (bool, False),
}
_TDX_KEYS: dict[str, tuple[type, bool]] = {
    "sept_ve_disable": (bool, False),
    "mrconfigid": (str, False),
    "mrowner": (str, False),
    "mrownerconfig": (str, False),
    "quote_generation_socket": (str, False),
    "attributes": (int, False),
}
_TEE_SECTIONS = {
    TeeKind.SEV: ("sev", _SEV_KEYS),
    TeeKind.SEV_ES: ("sev", _SEV_KEYS),
    TeeKind.SNP: ("snp", _SNP_KEYS),
    TeeKind.TDX: ("tdx", _TDX_KEYS),
}
# Direct boot with measured kernel hashes needs the memory-mapped (AmdSev / TDVF) builds.
_MEMORY_FIRMWARE = (TeeKind.SEV, TeeKind.SEV_ES, TeeKind.SNP, TeeKind.TDX)
# [shim] belongs to the shim (transport, bootstrap version); it validates that table itself.
_SECTIONS = ("hypervisor", "runtime", "sev", "snp", "tdx", "shim")


class _Reader:
    """Typed access to one TOML table, remembering where each key came from."""

    def __init__(self, source: str, section: str, table: object,
                 schema: dict[str, tuple[type, bool]]) -> None:
        self.source = source
        self.section = section
        if not isinstance(table, dict):
            raise ConfigError(source, section, "must be a table", table)
        self.table: dict[str, Any] = table
        for key, value in table.items():
            if key not in schema:
                raise ConfigError(source, self.name(key),
                                  f"unknown key (known: {', '.join(sorted(schema))})", value)
            want, _ = schema[key]
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                raise ConfigError(source, self.name(key),
                                  f"must be of type {want.__name__}, got {type(value).__name__}",
                                  value)
        for key, (_, required) in schema.items():
            if required and key not in table:
                raise ConfigError(source, self.name(key), "missing required key")

    def name(self, key: str) -> str:
        return f"{self.section}.{key}"

    def get(self, key: str, kind: type[T], default: T) -> T:
        value = self.table.get(key, default)
        if kind is float and value is not None:
            value = float(value)
        return value  # type: ignore[no-any-return]

    def opt(self, key: str, kind: type[T]) -> T | None:
        value = self.table.get(key)
        if kind is float and value is not None:
            value = float(value)
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.table.get(key, default)
        if value not in choices:
            raise ConfigError(self.source, self.name(key),
                              f"must be one of {', '.join(choices)}", value)
        return str(value)

    def positive(self, key: str, default: int | None) -> int | None:
        value = self.opt(key, int)
        if value is None:
            return default
        if value <= 0:
            raise ConfigError(self.source, self.name(key), "must be positive", value)
        return value

    def blob(self, key: str) -> bytes | None:
        value = self.opt(key, str)
        if value is None:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ConfigError(self.source, self.name(key), "must be base64", value) from err

    def convert(self, key: str, fn: Callable[[str], T]) -> T | None:
        value = self.opt(key, str)
        if value is None:
            return None
        try:
            return fn(value)
        except ValueError as err:
            raise ConfigError(self.source, self.name(key), str(err), value) from err


class _Paths:
    def __init__(self, source: str, variables: Mapping[str, str], base_dir: Path,
                 qemu_root: Path, check_files: bool) -> None:
        self.source = source
        self.variables = variables
        self.base_dir = base_dir
        self.qemu_root = qemu_root
        self.check_files = check_files

    def resolve(self, key: str, raw: str | None) -> Path | None:
        if raw is None:
            return None
        try:
            expanded = raw.format_map(_Strict(self.variables, self.source, key, raw))
        except (ValueError, IndexError) as err:
            raise ConfigError(self.source, key, f"bad placeholder: {err}", raw) from err
        path = Path(expanded)
        if not path.is_absolute():
            path = self.base_dir / path
        self.check(key, path)
        return path

    def resolve_host(self, key: str, raw: str | None) -> Path | None:
        """A file the shim itself reads (not QEMU): checked on the host, not in qemu_root."""
        if raw is None:
            return None
        try:
            path = Path(raw.format_map(_Strict(self.variables, self.source, key, raw)))
        except (ValueError, IndexError) as err:
            raise ConfigError(self.source, key, f"bad placeholder: {err}", raw) from err
        path = path if path.is_absolute() else self.base_dir / path
        if self.check_files and not path.is_file():
            raise ConfigError(self.source, key, "file does not exist", str(path))
        return path

    def check(self, key: str, path: Path) -> None:
        if not self.check_files:
            return
        on_host = self.qemu_root / path.relative_to("/")
        if not on_host.is_file():
            where = "" if self.qemu_root == Path("/") else f" under {self.qemu_root}"
            raise ConfigError(self.source, key, f"file does not exist{where}", str(path))


class _Strict(dict[str, str]):
    def __init__(self, values: Mapping[str, str], source: str, key: str, raw: str) -> None:
        super().__init__(values)
        self.source, self.key, self.raw = source, key, raw

    def __missing__(self, name: str) -> str:
        raise ConfigError(self.source, self.key,
                          f"unknown placeholder {{{name}}} (known: {', '.join(sorted(self))})",
                          self.raw)


def _quote_socket(text: str) -> UnixSocketAddress | VsockSocketAddress:
    if text.startswith("unix:"):
        return UnixSocketAddress(Path(text.removeprefix("unix:")))
    if text.startswith("vsock:"):
        cid, sep, port = text.removeprefix("vsock:").partition(":")
        if sep and cid.isdigit() and port.isdigit():
            return VsockSocketAddress(int(cid), int(port))
    raise ValueError("must be unix:<path> or vsock:<cid>:<port>")


def _root_image(source: str, image: Path | None, qemu_root: Path, confidential: bool,
                direct_boot: bool, check_files: bool) -> RootImage | None:
    """The root image, with its dm-verity parameters (the builder's ``<image>.verity``, read
    by the shim on the host) on a confidential profile that boots a kernel directly, where
    they are required (the root hash goes on its measured command line); a development
    profile mounts it unchecked, and without a kernel the firmware boots the disk itself
    (no command line of ours to carry a root hash)."""
    if image is None:
        return None
    if not confidential or not direct_boot:
        return RootImage(image)
    verity = qemu_root / verity_file(image).relative_to("/")
    if not verity.is_file():
        if check_files:
            raise ConfigError(source, "hypervisor.image",
                              f"a confidential profile needs the image's dm-verity parameters "
                              f"in {verity} (written by the guest image builder)", str(image))
        return RootImage(image)  # check_invariants refuses to launch it
    try:
        return RootImage(image, VerityRoot.from_file(verity))
    except RootImageError as err:
        raise ConfigError(source, "hypervisor.image", str(err), str(image)) from err


def _tee_params(source: str, tee: TeeKind, doc: dict[str, Any]) -> TeeParams:
    wanted = _TEE_SECTIONS.get(tee)
    for section in ("sev", "snp", "tdx"):
        if section in doc and (wanted is None or wanted[0] != section):
            raise ConfigError(source, section, f"section does not apply to tee = {tee.value!r}")
    if wanted is None:
        return None
    section, schema = wanted
    r = _Reader(source, section, doc.get(section, {}), schema)
    if tee in (TeeKind.SEV, TeeKind.SEV_ES):
        return SevParams(
            policy=r.opt("policy", int), cbitpos=r.opt("cbitpos", int),
            reduced_phys_bits=r.opt("reduced_phys_bits", int),
            kernel_hashes=r.opt("kernel_hashes", bool),
            legacy_vm_type=r.get("legacy_vm_type", bool, False),
        )
    if tee is TeeKind.SNP:
        return SnpParams(
            policy=r.get("policy", int, SnpParams.policy), cbitpos=r.opt("cbitpos", int),
            reduced_phys_bits=r.opt("reduced_phys_bits", int),
            kernel_hashes=r.opt("kernel_hashes", bool),
            host_data=r.blob("host_data"), id_block=r.blob("id_block"),
            id_auth=r.blob("id_auth"), author_key_enabled=r.opt("author_key_enabled", bool),
        )
    return TdxParams(
        sept_ve_disable=r.get("sept_ve_disable", bool, True),
        mrconfigid=r.blob("mrconfigid"), mrowner=r.blob("mrowner"),
        mrownerconfig=r.blob("mrownerconfig"),
        quote_generation_socket=r.convert("quote_generation_socket", _quote_socket),
        attributes=r.opt("attributes", int),
    )


def parse_profile(
    text: str,
    source: str = "<string>",
    *,
    variables: Mapping[str, str] | None = None,
    qemu_root: Path = Path("/"),
    base_dir: Path | None = None,
    check_files: bool = True,
) -> RuntimeProfile:
    """Parse and validate a runtime profile given as TOML text."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, "<toml>", f"not valid TOML: {err}") from err
    except RecursionError as err:  # tomllib recurses once per level of arrays/inline tables
        raise ConfigError(source, "<toml>", "arrays or tables nested too deeply") from err
    for section, value in doc.items():
        if section not in _SECTIONS:
            raise ConfigError(source, section,
                              f"unknown section (known: {', '.join(_SECTIONS)})", value)
    h = _Reader(source, "hypervisor", doc.get("hypervisor", {}), _HYPERVISOR_KEYS)
    rt = _Reader(source, "runtime", doc.get("runtime", {}), _RUNTIME_KEYS)
    tee_name = h.choice("tee", tuple(t.value for t in TeeKind))
    tee = TeeKind(tee_name)
    arch = Arch(h.choice("arch", tuple(a.value for a in Arch), Arch.X86_64.value))
    paths = _Paths(source, {**DEFAULT_VARIABLES, **(variables or {})},
                   base_dir if base_dir is not None else Path.cwd(), qemu_root, check_files)

    firmware: Firmware | None = None
    fw_path = paths.resolve("hypervisor.firmware", h.opt("firmware", str))
    fw_feature = h.opt("firmware_feature", str)
    if fw_path is not None and fw_feature is not None:
        raise ConfigError(source, "hypervisor.firmware_feature",
                          "give either firmware (a path) or firmware_feature, not both",
                          fw_feature)
    if fw_path is not None:
        firmware = Bios(fw_path)
    elif fw_feature is not None:
        desc = find_firmware(fw_feature, arch=arch.value,
                             machine=h.get("machine_type", str, arch.machine_type),
                             device="memory" if tee in _MEMORY_FIRMWARE else None,
                             root=qemu_root, source=source)
        firmware = desc.firmware()
        paths.check("hypervisor.firmware_feature", desc.executable)

    annotations = rt.get("enable_annotations", list, [])
    for item in annotations:
        if not isinstance(item, str):
            raise ConfigError(source, "runtime.enable_annotations",
                              "must be a list of strings", annotations)
    dial_timeout = rt.get("dial_timeout", float, 30.0)
    if dial_timeout <= 0:
        raise ConfigError(source, "runtime.dial_timeout", "must be positive", dial_timeout)

    boot_slots = rt.opt("boot_slots", int)
    if boot_slots is not None and boot_slots < 0:
        raise ConfigError(source, "runtime.boot_slots",
                          "must be 0 (no limit) or more (absent: one per host CPU)", boot_slots)

    initdata_file = paths.resolve_host("runtime.initdata", rt.opt("initdata", str))
    if initdata_file is not None and check_files:
        _check_initdata_file(source, initdata_file)

    confidential = tee.confidential or rt.get("confidential", bool, False)
    qemu = paths.resolve("hypervisor.qemu_path", h.opt("qemu_path", str))
    assert qemu is not None  # required key
    kernel = paths.resolve("hypervisor.kernel", h.opt("kernel", str))
    profile = RuntimeProfile(
        name=Path(source).stem,
        tee=tee,
        arch=arch,
        qemu=qemu,
        kernel=kernel,
        initrd=paths.resolve("hypervisor.initrd", h.opt("initrd", str)),
        image=_root_image(source, paths.resolve("hypervisor.image", h.opt("image", str)),
                          qemu_root, confidential, kernel is not None, check_files),
        kernel_params=h.get("kernel_params", str, ""),
        machine_type=h.opt("machine_type", str),
        cpu_model=h.opt("cpu_model", str),
        accel=h.choice("accelerator", ACCELERATORS, "kvm"),
        vcpus=h.positive("vcpus", 1) or 1,
        max_vcpus=h.positive("max_vcpus", None),
        memory_mib=h.positive("memory_mib", 2048) or 2048,
        memory_slots=h.positive("memory_slots", None),
        max_memory_mib=h.positive("max_memory_mib", None),
        firmware=firmware,
        tee_params=_tee_params(source, tee, doc),
        dial_timeout=dial_timeout,
        enable_annotations=tuple(annotations),
        vsock=h.choice("vsock", VSOCK_KINDS, "auto"),
        free_page_reporting=h.get("free_page_reporting", bool, False),
        source=source,
        qemu_root=qemu_root,
        allow_debug=h.get("allow_debug", bool, False),
        debug_console_bytes=h.opt("debug_console_bytes", int),
        allow_unbound_initdata=rt.get("allow_unbound_initdata", bool, False),
        initdata=initdata_file,
        confidential_without_tee=not tee.confidential and rt.get("confidential", bool, False),
        static_sizing=rt.get("static_sandbox_resource_mgmt", bool, True),
        sandbox_max_vcpus=rt.positive("sandbox_max_vcpus", None),
        sandbox_max_memory_mib=rt.positive("sandbox_max_memory_mib", None),
        boot_slots=boot_slots,
    )
    if tee.confidential and rt.opt("confidential", bool) is False:
        raise ConfigError(source, "runtime.confidential", f"a {tee.value} profile is "
                          "confidential: remove the key or set it true", False)
    for conflict in [*tee_safety_conflicts(profile), *confidential_conflicts(profile)]:
        raise ConfigError(source, conflict.key, conflict.message, conflict.value)
    return profile


def _check_initdata_file(source: str, path: Path) -> None:
    try:
        initdata.from_toml(path.read_bytes())
    except OSError as err:
        raise ConfigError(source, "runtime.initdata", f"cannot read: {err.strerror}",
                          str(path)) from err
    except initdata.InitdataError as err:
        raise ConfigError(source, "runtime.initdata", err.problem, str(path)) from err


def load_profile(
    path: Path | str,
    *,
    variables: Mapping[str, str] | None = None,
    qemu_root: Path = Path("/"),
    check_files: bool = True,
) -> RuntimeProfile:
    """Load and validate a runtime profile TOML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), "<file>", f"cannot read: {err.strerror}") from err
    return parse_profile(text, str(path), variables=variables, qemu_root=qemu_root,
                         base_dir=path.parent, check_files=check_files)
