"""netsim: a Kubernetes data plane (flannel, Calico, kube-proxy) built from Linux kernel objects."""

__version__ = "0.1.0"
