"""fastsip-load: the scapy-driven SIP REGISTER load generator bundled with fastsip.

Run it as ``python -m load ...`` from the repository root, or as the
``fastsip-load`` console script.  See load/README.md.  This package never
imports fastsip, and fastsip never imports it.
"""

__version__ = "0.1.0"
