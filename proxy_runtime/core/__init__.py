"""The sans-I/O proxy core: routing policy, calls, relays, timers and the dispatcher.

Bytes, events and ``now`` in; what to send and when to wake out. Imports only ``sip``,
``settings`` and ``metrics``; never the transport, operations or tools packages.
"""
