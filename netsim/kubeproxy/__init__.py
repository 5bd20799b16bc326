"""kube-proxy for netsim: services and endpoints programmed into each node, one module per mode."""
