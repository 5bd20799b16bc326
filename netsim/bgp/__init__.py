"""Calico's BGP data plane: one BIRD 2 per node, its configuration and its process lifecycle."""
