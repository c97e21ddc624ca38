"""What a pod VM is made of: the runtime profile (through the one config loader) and what the
pod's annotations may change in it (only keys on the profile's allow-list)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from hypervisor.config import parse_profile
from hypervisor.errors import ConfigError
from hypervisor.profile import RuntimeProfile
from shim.core.config import CONFIG_ENV, RuntimeOptions, config_source
from shim.core.errors import InvalidArgument
from shim.pod.guest_spec import POLICY_ANNOTATION, annotations_of

KATA_ANNOTATIONS: Final = "io.katacontainers."
KERNEL_PARAMS_ANNOTATION: Final = "io.katacontainers.config.hypervisor.kernel_params"


def runtime_profile(options: RuntimeOptions) -> RuntimeProfile:
    """The runtime profile from the one fallback chain (:func:`shim.core.config.config_source`).
    Any problem is InvalidArgument naming the file."""
    found = config_source(options)
    if found.text is None:
        raise InvalidArgument(f"runtime profile: none given (no runtime options config, "
                              f"${CONFIG_ENV} unset) and {found.source} does not exist")
    try:
        return parse_profile(found.text, found.source, base_dir=found.base_dir)
    except ConfigError as err:
        raise InvalidArgument(f"runtime profile: {err}") from err


@dataclass(frozen=True)
class PodAnnotations:
    """What the pod's (allowed) annotations ask of its VM."""

    policy: str | None = None  # the agent policy (Rego), decoded
    kernel_params: str = ""  # appended to the profile's kernel command line
    raw: Mapping[str, str] = field(default_factory=dict)  # all of the pod's annotations


def check_allowed(annotations: Mapping[str, str], policy: AnnotationPolicy,
                  what: str = "pod") -> None:
    """Kata-style annotations only from the profile's allow-list (for the pod and for every
    container of it: a later container must not bring what the pod could not)."""
    for key in sorted(annotations):
        if key.startswith(KATA_ANNOTATIONS) and key not in policy.allowed:
            raise InvalidArgument(
                f"{what}: annotation {key} is not allowed by runtime profile {policy.source} "
                f"(enable_annotations: {', '.join(sorted(policy.allowed)) or 'none'})")


@dataclass(frozen=True)
class AnnotationPolicy:
    """A profile's annotation allow-list, applied to every container of the pod (the first
    one's annotations shape the VM; any later one is held to the same list)."""

    allowed: frozenset[str]
    source: str

    @classmethod
    def of(cls, profile: RuntimeProfile) -> AnnotationPolicy:
        return cls(frozenset(profile.enable_annotations), str(profile.source))

    def check(self, spec: Mapping[str, object], what: str = "pod") -> PodAnnotations:
        return pod_annotations(spec, self, what)


def pod_annotations(spec: Mapping[str, object],
                    profile: RuntimeProfile | AnnotationPolicy,
                    what: str = "pod") -> PodAnnotations:
    """Kata-style annotations change the VM: only those on the profile's allow-list pass, and
    each must be well formed."""
    allow = profile if isinstance(profile, AnnotationPolicy) else AnnotationPolicy.of(profile)
    annotations = annotations_of(spec)
    check_allowed(annotations, allow, what)
    policy = annotations.get(POLICY_ANNOTATION)
    if policy is not None:
        try:
            policy = base64.b64decode(policy, validate=True).decode()
        except binascii.Error as err:
            raise InvalidArgument(f"annotation {POLICY_ANNOTATION}: not base64: {err}") from err
        except UnicodeDecodeError as err:
            raise InvalidArgument(f"annotation {POLICY_ANNOTATION}: the policy is not UTF-8: "
                                  f"{err}") from err
    return PodAnnotations(policy=policy,
                          kernel_params=annotations.get(KERNEL_PARAMS_ANNOTATION, ""),
                          raw=annotations)
