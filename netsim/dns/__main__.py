"""`python -m netsim.dns CONFIG.json`: the cluster DNS server (netsim/dns/server.py)."""

import sys

from netsim.dns.server import main

sys.exit(main())
