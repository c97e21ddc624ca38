"""``coco-shim``: operator and debugging commands.

Subcommands are argparse subparsers, each registered by one ``_add_<name>`` function, so more
can be added without touching the others. ``check``, ``vm`` and ``measure`` import only the
hypervisor package, ``protocols.initdata`` and the standard library (no grpc/protobuf),
``install`` only ``shim.cli.install`` (standard library), and each does it lazily.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

Handler = Callable[[argparse.Namespace], int]

DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
DEFAULT_RUN_ROOT = "/run/coco-shim/vm"


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=Path, default=None,
                   help="runtime profile TOML (firmware-configs/qemu-*.toml); default: the "
                   "shim's own ($COCO_SHIM_CONFIG, else /etc/coco-shim/configuration.toml)")
    p.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                   help="placeholder value for the profile, e.g. guest_image_dir=/srv/guest")
    p.add_argument("--qemu-root", type=Path, default=Path("/"),
                   help="filesystem root QEMU runs in (chroot); profile paths are inside it")


def _profile_path(args: argparse.Namespace) -> Path | None:
    """--profile, else the file the shim itself would read (the one fallback chain)."""
    if args.profile is not None:
        return Path(args.profile)
    from shim.core.config import RuntimeOptions, config_source
    from shim.core.errors import RpcError

    try:
        found = config_source(RuntimeOptions())
    except RpcError as err:
        raise SystemExit(f"coco-shim: {err}") from err
    return Path(found.source) if found.text is not None else None


def _variables(args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in args.var:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"coco-shim: --var wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


# --- check -----------------------------------------------------------------------------------


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="can this host run confidential VMs? (like kata-runtime "
                       "check)")
    _add_profile_args(p)
    p.add_argument("--qemu", default=DEFAULT_QEMU,
                   help="QEMU binary to probe when there is no profile")
    p.add_argument("--vhost-device-vsock", default=None,
                   help="vhost-device-vsock binary (default: $COCO_VHOST_DEVICE_VSOCK, PATH)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from hypervisor.config import load_profile
    from hypervisor.errors import HypervisorError
    from hypervisor.probe import (
        Fact,
        assess,
        probe_host,
        probe_kvm,
        probe_qemu,
        to_jsonable,
        which_vhost_device_vsock,
    )
    from hypervisor.profile import RuntimeProfile, TeeKind

    try:
        path = _profile_path(args)
        if path is not None:
            profile = load_profile(path, variables=_variables(args), qemu_root=args.qemu_root)
        else:
            profile = RuntimeProfile(name="none (default)", tee=TeeKind.NONE,
                                     qemu=Path(args.qemu), kernel=None, accel="auto",
                                     vsock="auto", qemu_root=args.qemu_root)
    except HypervisorError as err:
        print(f"coco-shim check: {err}", file=sys.stderr)
        return 2

    host = probe_host()
    backend = which_vhost_device_vsock(args.vhost_device_vsock)

    async def probe() -> tuple[Any, Fact, str | None]:
        kvm = (await probe_kvm(profile.qemu, qemu_root=profile.qemu_root)
               if host.kvm_device.ok else Fact(False, host.kvm_device.detail))
        try:
            return await probe_qemu(profile.qemu, qemu_root=profile.qemu_root), kvm, None
        except HypervisorError as err:
            return None, kvm, str(err)

    qemu, kvm, qemu_error = asyncio.run(probe())
    verdict = assess(profile, host, qemu, kvm, backend)
    tees = [t.value for t in TeeKind if t.confidential and host.tee(t).ok]
    summary = ", ".join([
        "KVM usable" if kvm.ok else "TCG only",
        f"TEE: {' '.join(tees)}" if tees else "no TEE",
        "kernel vhost-vsock" if host.vhost_vsock.ok else
        ("hybrid vsock" if backend else "hybrid vsock (vhost-device-vsock not found)"),
    ])
    if args.json:
        json.dump({
            "host": to_jsonable(host), "kvm_usable": to_jsonable(kvm),
            "vhost_device_vsock": None if backend is None else str(backend),
            "qemu": to_jsonable(qemu), "qemu_error": qemu_error,
            "profile": {"name": profile.name, "tee": profile.tee.value,
                        "source": profile.source},
            "verdict": to_jsonable(verdict), "summary": summary,
        }, sys.stdout, indent=2)
        print()
    else:
        _print_check(sys.stdout, profile, host, kvm, backend, qemu, qemu_error, verdict, summary)
    return 0 if verdict.ok else 1


def _row(out: TextIO, name: str, ok: bool | None, detail: str) -> None:
    mark = {True: "yes", False: "no", None: "-"}[ok]
    print(f"  {name:<24} {mark:<4} {detail}", file=out)


def _print_check(out: TextIO, profile: Any, host: Any, kvm: Any, backend: Path | None,
                 qemu: Any, qemu_error: str | None, verdict: Any, summary: str) -> None:
    print("Host", file=out)
    for name, fact in (("KVM device", host.kvm_device), ("KVM usable (boot probe)", kvm),
                       ("AMD SEV", host.sev), ("AMD SEV-ES", host.sev_es),
                       ("AMD SEV-SNP", host.snp), ("/dev/sev", host.sev_device),
                       ("Intel TDX", host.tdx), ("IBM Secure Execution", host.s390_pv),
                       ("IBM PEF", host.pef), ("vhost-vsock", host.vhost_vsock),
                       ("vhost-net", host.vhost_net)):
        _row(out, name, fact.ok, fact.detail)
    _row(out, "vhost-device-vsock", backend is not None,
         str(backend) if backend else "not found (hybrid vsock unavailable)")
    if qemu is None:
        print(f"QEMU {profile.qemu}: {qemu_error}", file=out)
    else:
        print(f"QEMU {qemu.binary} (version {qemu.version})", file=out)
        for qom_type, props in qemu.tee_types.items():
            _row(out, qom_type, props is not None,
                 ", ".join(props) if props is not None else "type not built in")
        _row(out, "SEV capabilities", qemu.sev_capabilities is not None,
             json.dumps(qemu.sev_capabilities) if qemu.sev_capabilities
             else str(qemu.sev_capabilities_error))
    print(f"Profile {profile.name} (tee {profile.tee.value})", file=out)
    _row(out, "can run here", verdict.ok,
         f"accelerator {verdict.accel}, vsock {verdict.vsock}" if verdict.ok
         else "; ".join(verdict.problems))
    print(f"Summary: {summary}", file=out)


# --- vm --------------------------------------------------------------------------------------


def _add_vm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vm", help="print or boot the VM a runtime profile describes")
    _add_profile_args(p)
    p.add_argument("--print-cmdline", action="store_true",
                   help="print the QEMU argv, one argument per line, and run nothing")
    p.add_argument("--accel", choices=("kvm", "tcg"), default=None,
                   help="override the profile's accelerator (default: profile; auto probes)")
    p.add_argument("--name", default="coco-vm")
    p.add_argument("--run-root", type=Path, default=Path(DEFAULT_RUN_ROOT),
                   help="parent of the per-VM run directory")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="keep console.log and qemu.stderr.log here")
    p.add_argument("--vhost-device-vsock", default=None)
    p.add_argument("--kernel-params", default="", help="appended to the profile's")
    p.add_argument("--initdata", type=Path, default=None, metavar="FILE",
                   help="initdata TOML document: bound to host-data/mrconfigid and delivered "
                   "as a read-only disk (default: the profile's [runtime] initdata)")
    p.add_argument("--powerdown-timeout", type=float, default=None,
                   help="seconds the guest gets to power off on Ctrl-C before `quit` "
                   "(default: the timeouts table)")
    p.set_defaults(func=_run_vm)


def _run_vm(args: argparse.Namespace) -> int:
    from hypervisor.config import load_profile
    from hypervisor.errors import HypervisorError
    from hypervisor.initdata import load_initdata_file
    from protocols.initdata import InitdataError

    try:
        path = _profile_path(args)
        if path is None:
            print("coco-shim vm: no profile: give --profile, or set $COCO_SHIM_CONFIG",
                  file=sys.stderr)
            return 2
        profile = load_profile(path, variables=_variables(args), qemu_root=args.qemu_root)
        source = args.initdata or profile.initdata
        initdata = None if source is None else load_initdata_file(source)
        if args.print_cmdline:
            return _print_cmdline(args, profile, initdata)
        return asyncio.run(_boot(args, profile, initdata))
    except (HypervisorError, InitdataError) as err:
        print(f"coco-shim vm: {err}", file=sys.stderr)
        return 2


def _print_cmdline(args: argparse.Namespace, profile: Any, initdata: Any) -> int:
    from hypervisor.choice import profile_vsock
    from hypervisor.profile import HybridVsock, KernelVsock, VmInstance, build_command_line

    accel = args.accel or profile.accel
    if accel == "auto":
        accel = "tcg"
        print("# accelerator \"auto\" is decided by a KVM probe at boot; printing tcg "
              "(use --accel)", file=sys.stderr)
    run_dir = args.run_root / f"{args.name}-XXXXXX"
    kind = profile_vsock(profile)
    vsock: KernelVsock | HybridVsock | None = None
    if kind == "kernel":
        vsock = KernelVsock(guest_cid=3, vhost_fd=3)
        print("# vhost-vsock: guest-cid and vhostfd are placeholders (allocated at boot)",
              file=sys.stderr)
    elif kind == "hybrid":
        vsock = HybridVsock(run_dir / "vhu.sock")
    vm = VmInstance(run_dir=run_dir, name=args.name, vsock=vsock, accel=accel,
                    extra_kernel_params=args.kernel_params, log_dir=args.log_dir,
                    initdata=initdata)
    argv = build_command_line(profile, vm).to_argv()
    if initdata is not None:
        field = profile.tee.initdata_field
        bound = f"bound to {field[0]} ({field[1]} bytes)" if field else "not bound (no field)"
        print(f"# initdata {initdata.algorithm} {initdata.digest().hex()}: {bound}; disk "
              f"{vm.initdata_disk} is written at boot", file=sys.stderr)
    for arg in argv:
        print(arg)
    return 0


async def _boot(args: argparse.Namespace, profile: Any, initdata: Any) -> int:
    from hypervisor.probe import resolve_accelerator, which_vhost_device_vsock
    from hypervisor.vm import LaunchOptions, launch_vm

    if profile.qemu_root != Path("/"):
        print("coco-shim vm: booting needs --qemu-root / (use --print-cmdline)",
              file=sys.stderr)
        return 2
    accel = args.accel or await resolve_accelerator(profile)
    if profile.accel == "auto" and not args.accel:
        print(f"# accelerator auto → {accel}", file=sys.stderr)
    vm = await launch_vm(profile, LaunchOptions(
        run_root=args.run_root, name=args.name, accel=accel,
        vhost_device_vsock=which_vhost_device_vsock(args.vhost_device_vsock),
        log_dir=args.log_dir, extra_kernel_params=args.kernel_params, initdata=initdata))
    console = (args.log_dir or vm.run_dir) / "console.log"
    print(f"VM running: pid {vm.pid}, run dir {vm.run_dir}, console {console}"
          + (f", vsock {vm.channel.hybrid_socket or vm.channel.guest_cid}" if vm.channel
             else "") + " (Ctrl-C stops it)", file=sys.stderr)
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        waiter = asyncio.ensure_future(vm.wait())
        stopper = asyncio.ensure_future(interrupted.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        reason = await (vm.stop() if args.powerdown_timeout is None
                        else vm.stop(powerdown_timeout=args.powerdown_timeout))
        waiter.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await vm.aclose()
    print(f"VM exited: {reason}", file=sys.stderr)
    return 0 if reason.clean else 1


# --- measure ---------------------------------------------------------------------------------


def _add_measure(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("measure", help="the launch measurement a pod of a profile will have "
                       "(SEV-SNP digest, TDX MRTD, ...), without TEE hardware")
    _add_profile_args(p)
    p.add_argument("--vcpus", type=int, default=None, help="pod shape (default: the profile's)")
    p.add_argument("--initdata", type=Path, default=None, metavar="FILE",
                   help="initdata TOML document (default: the profile's [runtime] initdata)")
    p.add_argument("--json", action="store_true", help="every input and result as JSON")
    p.add_argument("--rvps", type=Path, default=None, metavar="DIR",
                   help="also write trustee RVPS reference values for this pod shape to DIR")
    p.set_defaults(func=_run_measure)


def _run_measure(args: argparse.Namespace) -> int:
    from hypervisor.measure.command import run_measure

    path = _profile_path(args)
    if path is None:
        print("coco-shim measure: no profile: give --profile, or set $COCO_SHIM_CONFIG",
              file=sys.stderr)
        return 2
    return run_measure(path, variables=_variables(args), qemu_root=args.qemu_root,
                       vcpus=args.vcpus, initdata_file=args.initdata, as_json=args.json,
                       rvps_dir=args.rvps, out=sys.stdout, err=sys.stderr)


# --- install ---------------------------------------------------------------------------------


def _add_install(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install", help="register the runtime with containerd: drop-in config, "
                       "runtime profiles, RuntimeClass manifests")
    p.add_argument("--prefix", type=Path, default=Path("/"),
                   help="install under this root (default: /); the drop-in points at the "
                   "profiles under it")
    p.add_argument("--containerd-version", choices=("2", "1.7"), default="2",
                   help="containerd the drop-in is for: 2 (config version 3, default) or 1.7 "
                   "(version 2)")
    p.add_argument("--dry-run", action="store_true",
                   help="print a unified diff of what would change and write nothing")
    p.add_argument("--source", type=Path, default=None,
                   help="directory holding the qemu-*.toml profiles (default: the "
                   "firmware-configs/ shipped beside the package)")
    p.set_defaults(func=_run_install)


def _run_install(args: argparse.Namespace) -> int:
    from shim.cli.install import InstallError, install

    try:
        install(args.prefix, args.containerd_version, dry_run=args.dry_run, source=args.source)
    except InstallError as err:
        print(f"coco-shim install: {err}", file=sys.stderr)
        return 2
    return 0


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coco-shim",
                                     description="coco-shim operator and debugging tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_check(sub)
    _add_vm(sub)
    _add_measure(sub)
    _add_install(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.func
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
