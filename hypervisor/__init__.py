"""QEMU side of coco-shim: boot and stop (confidential) VMs, independent of the shim.

Modules (nouns):
  cmdline   typed QEMU command line: one dataclass per option group, each ``to_argv()``
  profile   TEE profiles (none, sev, sev-es, snp, tdx, s390-pv, pef): invariants + composition
  config    runtime profile TOML (firmware-configs/qemu-*.toml) -> RuntimeProfile
  firmware  firmware selection by feature from QEMU firmware descriptors
  monitor   QMP over qemu.qmp with per-call bounds and bounded event memory
  vm        QEMU process supervision: ordered launch with rollback, exit reason, stop
  nosuid    exec wrapper (stdlib only, run by path): a seccomp filter refusing setuid/setgid
            modes, for a QEMU that serves a host share (see cmdline.ReducedPrivileges)
  vsock     kernel vhost-vsock CID allocation; hybrid vsock (vhost-device-vsock)
  probe     host / QEMU capabilities, real KVM boot probe (behind ``coco-shim check``)
  initdata  which initdata a pod gets (annotation or profile file), refusal where no launch
            field binds it, the 0600 disk file (format: ``protocols.initdata``)
  measure/  launch measurements from a profile (SEV-SNP, SEV, SEV-ES, TDX MRTD), RVPS values
  choice    what "auto" accelerator and vsock mean on this host (decided only here)
  errors    typed errors (ConfigError, InvariantError, QemuError, ProbeError, VsockError,
            VmExited); timeouts: the one table of bounded waits, passed to what waits

This package never imports ``shim``.
"""
