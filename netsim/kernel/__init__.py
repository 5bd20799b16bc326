"""The only code that talks to the kernel. pyroute2_light goes first: see its docstring."""

from netsim.kernel import pyroute2_light  # noqa: F401
