"""Is the kvtier server in this pod serving?  One health request over CURVE.

    python3 probe.py ENDPOINT SERVER_PUBLIC_KEY CLIENT_SECRET_KEY [TIMEOUT_MS]

Exit 0 when the server answers ``ok`` within the timeout, 1 otherwise; the
kubelet runs it as the server container's readiness and liveness probe.  The
client key is the ``probe`` tenant's: a namespace that is never opened, so the
probe reserves no memory and sees no tenant's blocks.
"""
import sys

from kvtier.remote.client import RemoteTier


def main(argv):
    endpoint, server_key, client_key = argv[:3]
    timeout_ms = int(argv[3]) if len(argv) > 3 else 2000
    tier = RemoteTier("probe", 4096, [endpoint], namespace="probe", timeout_ms=timeout_ms,
                      server_public_key=server_key, client_secret_key=client_key)
    try:
        body = tier.ping()[0]
    finally:
        tier.close()
    if not body or body.get("status") != "ok":
        print(f"{endpoint}: no health reply within {timeout_ms} ms", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
