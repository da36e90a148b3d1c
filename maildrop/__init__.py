"""maildrop: store-and-forward file mail for servers.

Pure core: ids -> events -> model -> routing/gossip/relay/protocol.
Edges: eventlog, spool, transport, watcher (they never import each other).
Shell: agent -> cli.
"""

__version__ = "0.1.0"
