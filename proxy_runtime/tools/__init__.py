"""Tools the proxy never runs: the ClearIP simulator, simulated switch/carrier peers, the demo.

They speak SIP through ``sip/`` only (the demo also starts the real server); nothing in the
proxy imports this package.
"""
