"""The ``nodeagent`` command line. It talks to a running agent only through the LocalAPI."""
