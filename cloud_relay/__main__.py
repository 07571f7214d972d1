"""``edge-intercom-relay``: the cloud relay (presence, routing, pairing, dashboard).

The relay lands with the MQTT control plane (issue 4); until then the entry
point exists so that packaging and the service units can refer to it.
"""

import sys


def main() -> int:
    print("edge-intercom-relay: not implemented yet (MQTT control plane, issue 4)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
