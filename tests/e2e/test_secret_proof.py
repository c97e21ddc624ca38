"""The proof that secrets reach the workload only inside the guest (issue 13 item 4).

containerd 2.1.9, CRI, a coco-dev pod whose initdata points the guest at the reference KBS
(its own namespace, routed from the pod network, TLS from a test CA carried in initdata), with
a fresh random 32-byte secret per run. One container, its image pulled in the guest, (a)
fetches the secret from the data hub's endpoint http://127.0.0.1:8006/cdh/resource/… and
prints only its SHA-256, (b) gets a ``sealed.`` env value (vault type, naming a KBS resource)
and prints the SHA-256 of the unsealed value. Both digests must be right, and no spelling of
the secret (raw, hex, base64, base64url at every alignment) may appear in any byte the host
handled (tests/support/proof.py lists the sources), nor in the capture of the pod network.

Negatives: a tampered sealed value is refused by the guest at StartContainer (same pod); a pod whose
initdata is not the one the KBS expects gets HTTP 403, shown in its container's output.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.support.kbs_net import SECRET_PATH
from tests.support.proof import HostBytes
from tests.support.proof_env import ProofEnv, proof_env, sha256_lines
from tests.support.secret_scan import Source, scan

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

FETCH_AND_DIGEST = [
    "/bin/sh", "-c",
    f"wget -q -O - http://127.0.0.1:8006/cdh/resource/{SECRET_PATH} | sha256sum; "
    'printf %s "$PROOF_SEALED" | sha256sum']
FETCH_ONLY = ["/bin/sh", "-c",
              f"wget -O - http://127.0.0.1:8006/cdh/resource/{SECRET_PATH} 2>&1 | "
              "sed 's/^/fetch: /'; echo done"]


@pytest.fixture(scope="module")
def proof() -> Iterator[ProofEnv]:
    with proof_env() as env:
        yield env


def test_secret_reaches_only_the_guest(proof: ProofEnv) -> None:
    kbs = proof.kbs
    host = HostBytes(proof.base / "host-bytes")
    pod_id, pod = proof.run_pod("proof", kbs.initdata)
    try:
        sealed = kbs.sealed_env_value()
        config = proof.container("digests", FETCH_AND_DIGEST, {"PROOF_SEALED": sealed})
        output = proof.run_to_exit(pod_id, pod, config)
        assert sha256_lines(output) == [kbs.secret_sha256, kbs.text_sha256], output

        # A tampered sealed value: refused in the guest, naming the cause. (CRI's
        # CreateContainer only records the container; the agent's CreateContainer runs at
        # StartContainer, when containerd creates the task.)
        tampered = proof.container("tampered", ["/bin/true"],
                                   {"PROOF_SEALED": kbs.tampered_env_value()})
        tampered_id = proof.client.create_container(pod_id, tampered, pod)
        with pytest.raises(grpc.RpcError) as refused:
            proof.client.start_container(tampered_id)
        assert "sealed secret refused" in str(refused.value.details()), \
            refused.value.details()

        released = [r for r in kbs.releases() if r.init_data == kbs.initdata_digest]
        assert {r.path for r in released} >= {SECRET_PATH, "default/secret/proof-text"}
        assert all(r.tee == "sample" for r in released)
        proof.snapshot_pod(host, pod_id)
    finally:
        proof.end_pod(pod_id)

    # The other pod: same KBS, an initdata the policy does not know → 403 in its output.
    other_id, other = proof.run_pod("stranger", kbs.other_initdata())
    try:
        denied = proof.run_to_exit(other_id, other, proof.container("fetch", FETCH_ONLY))
        assert "403" in denied, denied
        assert scan(kbs.secret, [Source.of("stranger output", denied.encode())]) == []
        proof.snapshot_pod(host, other_id)
    finally:
        proof.end_pod(other_id)

    proof.host_bytes(host)
    findings = host.scan(kbs.secret)
    assert findings == [], "\n".join(str(f) for f in findings)
    # The recorder saw the shim ↔ agent channel (the container's output crossed it).
    recorded = b"".join(s.read() for s in host.sources if s.name.startswith("vsock recording"))
    assert kbs.secret_sha256.encode() in recorded
    assert sealed.encode() in recorded  # the host handled the sealed form, and only that
