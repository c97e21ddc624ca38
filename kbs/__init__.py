"""A reference Key Broker Service speaking trustee's KBS protocol 0.4.0, for tests and demos.

Never imported by ``shim/`` (a test enforces it). Run it as its own process::

    python -m kbs --listen 198.18.0.1:8080 --resources DIR --policy policy.toml \
        [--tls-cert cert.pem --tls-key key.pem]

- :mod:`kbs.core`   — sessions and nonces, the sample verifier, the resource policy, tokens
- :mod:`kbs.server` — the HTTP edge (``/kbs/v0/auth``, ``/attest``, ``/resource/…``) with
  trustee's RFC 7807 error bodies
"""
