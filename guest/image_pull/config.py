"""The guest's image-pull settings.

The file is TOML shaped like confidential-data-hub's ``cdh.toml`` so that the same settings can
later come from initdata (:func:`load_pull_config` takes the TOML text, whole ``cdh.toml`` or
just its ``[image]`` table; other top-level tables belong to other CDH parts and are ignored)::

    [image]
    extra_root_certificates = ["-----BEGIN CERTIFICATE-----\\n…"]  # trusted besides the bundle
    max_concurrent_layer_downloads_per_image = 3
    work_dir = "/run/coco-agent/images"            # layer cache, overlay dirs (not host-writable)
    image_pull_timeout = 1200                      # seconds per pull (Kata agent's name)
    registry_connect_timeout = 10                  # seconds to reach a registry (ours)
    ca_bundle = "/etc/ssl/certs/ca-certificates.crt"  # system roots ("" for none; ours)
    authenticated_registry_credentials_uri = "file:///etc/coco/auth.json"  # or kbs:///…

    [[image.registry_config.registry]]             # containers-registries.conf v2 entries
    location = "registry.test:5000"                 # or prefix = …
    insecure = true                                 # plain HTTP for this registry
    blocked = false                                 # true: refuse to pull from it

Keys CDH knows but this guest does not implement (signature policies, sigstore, proxies,
mirrors, remapping, KBS URIs) are refused by name, never silently ignored: a policy someone
believes is enforced must not be dropped.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from guest.agent.errors import InvalidArgument

DEFAULT_CONFIG_PATH = Path("/etc/coco/image-pull.toml")
DEFAULT_WORK_DIR = Path("/run/coco-agent/images")  # outside the shared root (CopyFile)
DEFAULT_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_TIMEOUT = 1200.0  # Kata agent's image_pull_timeout default
DEFAULT_CONCURRENCY = 3  # CDH's max_concurrent_layer_downloads_per_image default
DEFAULT_CONNECT_TIMEOUT = 10.0

UNSUPPORTED_IMAGE_KEYS = {
    "image_security_policy_uri": "image signature policies",
    "image_security_policy": "image signature policies",
    "sigstore_config_uri": "sigstore signatures",
    "registry_configuration_uri": "registry configuration from a URI",
    "image_pull_proxy": "pulling through a proxy",
}
IMAGE_KEYS = {
    "extra_root_certificates",
    "max_concurrent_layer_downloads_per_image",
    "work_dir",
    "image_pull_timeout",
    "registry_connect_timeout",
    "authenticated_registry_credentials_uri",
    "registry_config",
    "ca_bundle",
}
REGISTRY_KEYS = {"location", "prefix", "insecure", "blocked"}


class RegistryRule(NamedTuple):
    """One ``[[registry]]`` entry: which images it covers and how to reach them."""

    prefix: str  # matched against "<registry>/<repository>"
    insecure: bool = False
    blocked: bool = False

    def covers(self, name: str) -> bool:
        """containers-registries.conf matching: the prefix, then a '/' or ':' boundary."""
        if name == self.prefix:
            return True
        return name.startswith(self.prefix) and (
            self.prefix.endswith("/") or name[len(self.prefix)] in "/:@"
        )


class PullConfig(NamedTuple):
    work_dir: Path = DEFAULT_WORK_DIR
    ca_bundle: Path | None = DEFAULT_CA_BUNDLE  # system roots; None: only the extra ones
    extra_root_certificates: tuple[str, ...] = ()
    registries: tuple[RegistryRule, ...] = ()
    credentials: Mapping[str, tuple[str, str]] = MappingProxyType({})  # host -> user, pass
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY

    def rule_for(self, name: str) -> RegistryRule | None:
        """The longest matching rule for ``<registry>/<repository>``, as registries.conf does."""
        found = [rule for rule in self.registries if rule.covers(name)]
        return max(found, key=lambda rule: len(rule.prefix)) if found else None

    def is_insecure(self, host: str) -> bool:
        """Plain HTTP allowed for this host (a rule for exactly this host says insecure)."""
        return any(rule.insecure and rule.prefix.rstrip("/") == host for rule in self.registries)


Resource = Callable[[str], bytes]  # fetches a kbs:/// URI (guest.attestation's DataHub)


def load_pull_config(
    text: str, *, origin: str = "image pull configuration", resource: Resource | None = None
) -> PullConfig:
    """Parse TOML text (a whole ``cdh.toml`` or a file with just ``[image]``).

    ``kbs:///`` URIs (in ``extra_root_certificates`` and
    ``authenticated_registry_credentials_uri``) are fetched with ``resource``, e.g.
    ``guest.attestation.cdh.DataHub.resource`` once the guest has attested; without it they
    are refused."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InvalidArgument(f"{origin}: not valid TOML: {err}") from err
    image = document.get("image", {})
    if not isinstance(image, dict):
        raise InvalidArgument(f"{origin}: [image] must be a table")
    return _from_image_table(image, origin, resource)


def read_pull_config(path: Path = DEFAULT_CONFIG_PATH) -> PullConfig:
    """The configuration file, or the defaults when it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return PullConfig()
    except OSError as err:
        raise InvalidArgument(f"cannot read {path}: {err.strerror}") from err
    return load_pull_config(text, origin=str(path))


def guest_pull_config(
    cdh_toml: str | None, path: Path = DEFAULT_CONFIG_PATH, resource: Resource | None = None
) -> PullConfig:
    """The agent's settings: initdata's ``cdh.toml`` when it has an ``[image]`` table (its
    ``kbs:///`` URIs fetched with ``resource``), else the image's file at ``path``."""
    if cdh_toml is not None:
        try:
            has_image = "image" in tomllib.loads(cdh_toml)
        except tomllib.TOMLDecodeError as err:
            raise InvalidArgument(f"initdata cdh.toml: not valid TOML: {err}") from err
        if has_image:
            return load_pull_config(cdh_toml, origin="initdata cdh.toml", resource=resource)
    return read_pull_config(path)


def _fetch(uri: str, resource: Resource | None, key: str, origin: str) -> bytes:
    if resource is None:
        raise InvalidArgument(
            f"{origin}: {key} {uri} needs the KBS (attestation), not available here"
        )
    try:
        return resource(uri)
    except Exception as err:
        raise InvalidArgument(f"{origin}: {key}: fetching {uri} failed: {err}") from err


def _from_image_table(image: dict[str, Any], origin: str, resource: Resource | None) -> PullConfig:
    for key in image:
        if key in UNSUPPORTED_IMAGE_KEYS:
            raise InvalidArgument(
                f"{origin}: [image] {key} ({UNSUPPORTED_IMAGE_KEYS[key]}) is not supported by "
                "this guest; remove it rather than believe it enforced"
            )
        if key not in IMAGE_KEYS:
            raise InvalidArgument(f"{origin}: unknown key [image] {key}")
    values: dict[str, Any] = {}
    if "work_dir" in image:
        values["work_dir"] = _abs_path(image["work_dir"], "work_dir", origin)
    if "ca_bundle" in image:
        bundle = image["ca_bundle"]
        values["ca_bundle"] = None if bundle == "" else _abs_path(bundle, "ca_bundle", origin)
    if "extra_root_certificates" in image:
        certs = image["extra_root_certificates"]
        if isinstance(certs, list):
            certs = [
                _fetch(c, resource, "extra_root_certificates", origin).decode()
                if isinstance(c, str) and c.startswith("kbs://")
                else c
                for c in certs
            ]
        if not isinstance(certs, list) or not all(
            isinstance(c, str) and "BEGIN CERTIFICATE" in c for c in certs
        ):
            raise InvalidArgument(
                f"{origin}: extra_root_certificates must be a list of PEM certificates"
            )
        values["extra_root_certificates"] = tuple(certs)
    if "max_concurrent_layer_downloads_per_image" in image:
        count = image["max_concurrent_layer_downloads_per_image"]
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 64:
            raise InvalidArgument(
                f"{origin}: max_concurrent_layer_downloads_per_image must be 1..64"
            )
        values["concurrency"] = count
    for key, field_name in (
        ("image_pull_timeout", "timeout"),
        ("registry_connect_timeout", "connect_timeout"),
    ):
        if key in image:
            seconds = image[key]
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
                raise InvalidArgument(f"{origin}: {key} must be a positive number")
            values[field_name] = float(seconds)
    if "registry_config" in image:
        values["registries"] = _registries(image["registry_config"], origin)
    if "authenticated_registry_credentials_uri" in image:
        uri = image["authenticated_registry_credentials_uri"]
        values["credentials"] = _credentials(uri, origin, resource)
    return PullConfig(**values)


def _abs_path(value: object, key: str, origin: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidArgument(f"{origin}: {key} must be an absolute path")
    return Path(value)


def _registries(table: object, origin: str) -> tuple[RegistryRule, ...]:
    if not isinstance(table, dict):
        raise InvalidArgument(f"{origin}: [image.registry_config] must be a table")
    for key in table:
        if key != "registry":
            raise InvalidArgument(
                f"{origin}: [image.registry_config] {key} is not supported by this guest"
            )
    entries = table.get("registry", [])
    if not isinstance(entries, list):
        raise InvalidArgument(f"{origin}: registry_config.registry must be an array of tables")
    rules = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{origin}: registry_config.registry entries must be tables")
        unknown = set(entry) - REGISTRY_KEYS
        if unknown:
            raise InvalidArgument(
                f"{origin}: registry entry keys {sorted(unknown)} (mirrors, remapping) are not "
                "supported by this guest"
            )
        prefix = entry.get("prefix") or entry.get("location")
        if "prefix" in entry and "location" in entry and entry["prefix"] != entry["location"]:
            raise InvalidArgument(
                f"{origin}: registry entry {entry['prefix']!r}: remapping to another location "
                "is not supported by this guest"
            )
        if not isinstance(prefix, str) or not prefix:
            raise InvalidArgument(f"{origin}: a registry entry needs a location or a prefix")
        flags = {k: entry.get(k, False) for k in ("insecure", "blocked")}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise InvalidArgument(f"{origin}: registry {prefix}: insecure/blocked are booleans")
        rules.append(RegistryRule(prefix=prefix, **flags))
    return tuple(rules)


def _credentials(uri: object, origin: str, resource: Resource | None) -> dict[str, tuple[str, str]]:
    """A docker ``config.json`` (``{"auths": {"host": {"auth": base64(user:pass)}}}``, or
    ``username``/``password`` members) from a file:/// or kbs:/// URI."""
    key = "authenticated_registry_credentials_uri"
    if not isinstance(uri, str) or not uri.startswith(("file:///", "kbs://")):
        raise InvalidArgument(f"{origin}: {key} must be a file:/// or kbs:/// URI")
    import base64
    import json  # here: the agent reads these settings before it listens

    path = Path(uri.removeprefix("file://"))
    try:
        if uri.startswith("kbs://"):
            text = _fetch(uri, resource, key, origin).decode()
        else:
            text = path.read_text()
        auths = json.loads(text)["auths"]
        out: dict[str, tuple[str, str]] = {}
        for host, entry in auths.items():
            if "auth" in entry:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            else:
                user, password = str(entry["username"]), str(entry.get("password", ""))
            out[host.removeprefix("https://").removeprefix("http://").rstrip("/")] = (
                user,
                password,
            )
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InvalidArgument(f"{origin}: registry credentials from {uri}: {err}") from err
