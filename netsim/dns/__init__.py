"""Cluster DNS: the zone CoreDNS's kubernetes plugin would serve (zone.py), and a small server
that serves it inside a pod's namespace and follows the store (server.py)."""
