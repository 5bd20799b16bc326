"""The only code that talks to the kernel: namespaces, netlink, sysctls, nftables, processes."""
