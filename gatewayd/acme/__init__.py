"""Automatic certificates: ACME (RFC 8555) with TLS-ALPN-01 (RFC 8737) and HTTP-01.

Modules:

* :mod:`~gatewayd.acme.challenges` (pure): key authorizations, the RFC 8737
  challenge certificate, HTTP-01 paths.
* :mod:`~gatewayd.acme.schedule` (pure): renewal times and retry backoff.
* :mod:`~gatewayd.acme.store`: the state directory (account, certificates,
  pending challenges, the CA lock), written atomically.
* :mod:`~gatewayd.acme.client`: one issuance with certbot's ``acme`` library
  (blocking, run in a thread).
* :mod:`~gatewayd.acme.manager` (trio): the loop in the running daemon.
"""
