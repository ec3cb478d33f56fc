"""The sans-I/O proxy core: routing policy, calls, relays, timers and the dispatcher.

Bytes, events and ``now`` in; what to send and when to wake out. Imports only ``sip``,
``settings`` and ``metrics``; never the transport, operations or tools packages.

Modules, each a small state machine or a pure helper, imported in this order (no cycles):

- ``timers``: the timer heap and per-duration queues; reads ``deadline`` only.
- ``stamp``: ``Target``, server-transaction keys, where responses go, our Via / Record-Route,
  loop detection, next hop.
- ``routing``: pure policy (ClearIP reply table, advance rules, best response, allow-list).
- ``transactions``: the transaction tables, CANCELs we send, Timer C guards, transport errors.
- ``relay``: ``Relay``, one in-dialog or pre-routed request relayed along its Route set.
- ``call``: ``Call``, one initial INVITE's life (ClearIP, ``Branch`` per carrier attempt), acting
  through the ``CallHost`` protocol.
- ``proxy``: ``ProxyCore``, the dispatcher the adapter feeds; it implements ``CallHost``.
"""


def build_kind() -> str:
    """``compiled`` when the sans-I/O packages (``sip``, ``core``) and the metrics modules each call
    runs through (``recorder``, ``stir``) run as mypyc-compiled modules (``CLEARIP_COMPILE``, see
    setup.py), ``pure`` when they run from their Python sources,
    ``mixed`` when only some are compiled (a broken install: the compiled modules and the sources
    come from different builds)."""
    from proxy_runtime.core import call, proxy, timers
    from proxy_runtime.metrics import recorder, stir
    from proxy_runtime.sip import message, parse, transaction

    modules = (call, proxy, timers, message, parse, transaction, recorder, stir)
    compiled = {not str(m.__file__).endswith(".py") for m in modules}
    return "mixed" if len(compiled) > 1 else "compiled" if compiled.pop() else "pure"
