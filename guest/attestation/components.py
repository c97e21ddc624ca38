"""Start the guest components (attestation agent, data hub, resource endpoint) from initdata.

The agent, after the initdata module wrote ``/run/confidential-containers/initdata/``::

    from guest.attestation.components import GuestComponents
    components = GuestComponents.start()       # reads aa.toml, cdh.toml, initdata.toml
    sandbox = Sandbox(..., secrets=components.hub)
    ...
    components.close()                          # at shutdown

With no KBS configured, the hub still exists (sealed values then fail with a clear error)
and no endpoint is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guest.attestation import config
from guest.attestation.attesters import attester_for
from guest.attestation.cdh import SIGNING_KEYS_DIR, DataHub
from guest.attestation.client import KbsClient
from guest.attestation.server import ADDRESS, ResourceServer
from guest.tee import Tee, detect
from guest.tee.tsm import TsmReports


@dataclass
class GuestComponents:
    hub: DataHub
    client: KbsClient | None
    endpoint: ResourceServer | None

    @classmethod
    def start(
        cls,
        initdata_dir: Path = config.INITDATA_DIR,
        *,
        tee: Tee | None = None,
        tsm: TsmReports | None = None,
        address: tuple[str, int] = ADDRESS,
        signing_keys: Path = SIGNING_KEYS_DIR,
        serve: bool = True,
    ) -> GuestComponents:
        settings = config.load(initdata_dir)
        client = None
        if settings.kbs is not None:
            platform = tee if tee is not None else detect(tsm)
            client = KbsClient(
                settings.kbs.url,
                attester_for(platform, tsm),
                cert_pem=settings.kbs.cert,
                initdata_toml=settings.initdata_toml,
            )
        hub = DataHub(client.resource if client else None, settings.image, signing_keys)
        endpoint = None
        if client is not None and serve:
            endpoint = ResourceServer(hub, address)
            endpoint.start()
        return cls(hub, client, endpoint)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
