"""netsim's CNI side: pod wiring per mode and host-local compatible IPAM."""
