"""``nodeagent demo``: a small tailnet built on this machine, and the story of a rejected
connection told on it.

Owns the demo command. ``lab`` builds and removes the network namespaces and processes,
``leftovers`` records what a run made (a state file per run) and removes what a killed run left,
``story`` runs the scenario and prints it, ``cli`` registers the command. Nothing here is used by
the agent itself; the demo drives the agent, the control server and the derper as separate
processes, as a person would.
"""
