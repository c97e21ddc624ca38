"""Initdata on the host: which document a pod gets, and how a VM carries it.

The document format (decode, bounds, digest, disk bytes) lives in :mod:`protocols.initdata`,
shared with the guest. Here: the choice between the pod's annotation and the profile's default
file, the refusal on TEEs with no launch field to bind the digest to, and the 0600 disk file.
Binding itself (SNP ``host-data`` / TDX ``mrconfigid``) is part of the command line
(:func:`hypervisor.profile.build_command_line` with ``VmInstance.initdata``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from hypervisor.profile import RuntimeProfile, unbound_initdata_message
from protocols.initdata import ANNOTATION, Initdata, InitdataError, decode_annotation, from_toml


class InitdataNotAllowedError(InitdataError):
    """The profile refuses this initdata: annotation not allow-listed, or no field to bind it."""


def resolve_initdata(profile: RuntimeProfile,
                     annotations: Mapping[str, str] | None = None) -> Initdata | None:
    """The initdata a pod of this profile boots with, validated, before anything boots.

    The pod annotation ``io.katacontainers.config.hypervisor.cc_init_data`` when present (it
    must be on the profile's ``enable_annotations``), else the profile's ``[runtime] initdata``
    file, else None. Raises :class:`~protocols.initdata.InitdataError` (a subclass names the
    problem) for a malformed, oversized or refused document.
    """
    value = (annotations or {}).get(ANNOTATION)
    if value is not None:
        if ANNOTATION not in profile.enable_annotations:
            raise InitdataNotAllowedError(
                f"annotation {ANNOTATION} is not allowed by runtime profile {profile.source} "
                "(add it to [runtime] enable_annotations)")
        doc = decode_annotation(value)
    elif profile.initdata is not None:
        try:
            raw = profile.initdata.read_bytes()
        except OSError as err:
            raise InitdataError(f"cannot read the profile's initdata file {profile.initdata}: "
                                f"{err.strerror}") from err
        doc = from_toml(raw)
    else:
        return None
    tee = profile.tee
    if tee.confidential and tee.initdata_field is None and not profile.allow_unbound_initdata:
        raise InitdataNotAllowedError(f"runtime profile {profile.source}: "
                                      f"{unbound_initdata_message(tee)}")
    return doc


def load_initdata_file(path: Path) -> Initdata:
    """An operator's TOML document (``coco-shim vm|measure --initdata FILE``)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InitdataError(f"cannot read {path}: {err.strerror}") from err
    return from_toml(raw)


def write_disk(path: Path, doc: Initdata) -> None:
    """The raw disk image, created 0600 (never through a symlink, never over a file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(doc.disk_image())


__all__ = ["InitdataNotAllowedError", "load_initdata_file", "resolve_initdata", "write_disk"]
