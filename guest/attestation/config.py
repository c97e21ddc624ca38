"""``aa.toml`` and ``cdh.toml`` as initdata carries them (guest-components' key names).

aa.toml::

    [token_configs.kbs]
    url = "https://198.18.0.1:8080"
    cert = '''-----BEGIN CERTIFICATE----- …'''   # optional: the KBS's TLS certificate

cdh.toml::

    [kbc]
    name = "cc_kbc"
    url = "https://198.18.0.1:8080"
    kbs_cert = '''…'''                           # optional

    [image]
    authenticated_registry_credentials_uri = "kbs:///default/credential/registry"
    extra_root_certificates = ["-----BEGIN CERTIFICATE----- …", "kbs:///default/ca/registry"]

The KBS the agent attests to is cdh.toml's ``[kbc]`` (the data hub is the consumer of
resources), else aa.toml's ``[token_configs.kbs]``. An ``extra_root_certificates`` entry that is
a ``kbs://`` URI is fetched from the KBS (our extension: upstream takes inline PEM only).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guest.attestation.errors import ConfigError
from protocols.kbs import ProtocolError, ResourceUri

INITDATA_DIR = Path("/run/confidential-containers/initdata")
SUPPORTED_KBC = ("cc_kbc",)


@dataclass(frozen=True)
class KbsConfig:
    url: str
    cert: str | None = None  # PEM of the KBS's TLS certificate (or of its CA)


@dataclass(frozen=True)
class ImageConfig:
    registry_credentials_uri: ResourceUri | None = None
    extra_root_certificates: tuple[str, ...] = ()  # inline PEM or kbs:// URIs


@dataclass(frozen=True)
class GuestConfig:
    kbs: KbsConfig | None
    image: ImageConfig = field(default_factory=ImageConfig)
    initdata_toml: str | None = None  # the whole initdata document (sent as init-data)


def _toml(text: str, name: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{name} is not valid TOML: {err}") from err


def _table(doc: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: [{key}] must be a table")
    return value


def _url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(f"{where} must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


def _cert(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        raise ConfigError(f"{where} must be a PEM certificate")
    return value


def _uri(value: Any, where: str) -> ResourceUri:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a kbs:// resource URI")
    try:
        return ResourceUri.parse(value)
    except ProtocolError as err:
        raise ConfigError(f"{where}: {err}") from err


def parse(aa_toml: str | None, cdh_toml: str | None, initdata_toml: str | None = None) -> (
    GuestConfig
):
    kbs: KbsConfig | None = None
    image = ImageConfig()
    if aa_toml:
        aa = _toml(aa_toml, "aa.toml")
        token = _table(_table(aa, "token_configs", "aa.toml"), "kbs", "aa.toml")
        if token:
            kbs = KbsConfig(_url(token.get("url"), "aa.toml token_configs.kbs.url"),
                            _cert(token.get("cert"), "aa.toml token_configs.kbs.cert"))
    if cdh_toml:
        cdh = _toml(cdh_toml, "cdh.toml")
        kbc = _table(cdh, "kbc", "cdh.toml")
        if kbc:
            name = kbc.get("name", "cc_kbc")
            if name not in SUPPORTED_KBC:
                raise ConfigError(f"cdh.toml kbc.name {name!r} is not supported "
                                  f"(the reference guest speaks {', '.join(SUPPORTED_KBC)})")
            kbs = KbsConfig(_url(kbc.get("url"), "cdh.toml kbc.url"),
                            _cert(kbc.get("kbs_cert"), "cdh.toml kbc.kbs_cert"))
        section = _table(cdh, "image", "cdh.toml")
        creds = section.get("authenticated_registry_credentials_uri")
        roots = section.get("extra_root_certificates", [])
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise ConfigError("cdh.toml image.extra_root_certificates must be a list of strings")
        for i, root in enumerate(roots):
            where = f"cdh.toml image.extra_root_certificates[{i}]"
            if root.startswith("kbs://"):
                _uri(root, where)
            else:
                _cert(root, where)
        image = ImageConfig(
            registry_credentials_uri=(
                _uri(creds, "cdh.toml image.authenticated_registry_credentials_uri")
                if creds else None
            ),
            extra_root_certificates=tuple(roots),
        )
    return GuestConfig(kbs=kbs, image=image, initdata_toml=initdata_toml)


def load(directory: Path = INITDATA_DIR) -> GuestConfig:
    """Read aa.toml, cdh.toml and initdata.toml from the initdata directory (each optional)."""

    def read(name: str) -> str | None:
        path = directory / name
        try:
            return path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err

    return parse(read("aa.toml"), read("cdh.toml"), read("initdata.toml"))
