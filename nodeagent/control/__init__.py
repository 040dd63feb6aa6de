"""The control plane: coordination server, its protocol, the node's control client, admin client.

Modules: ``proto`` (wire messages and the encrypted channel), ``policy`` (+ ``hujson``),
``store`` (persistence), ``mapper`` (netmaps and deltas), ``server`` (+ ``admin_routes``),
``client`` (the node side) and ``admin`` (the CLI's admin client).
"""
