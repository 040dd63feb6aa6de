"""derpprobe: watches a fleet of DERP servers (the nodes of a Tailscale DERP map).

Per node it checks the TLS certificate, a DERP login, STUN, a packet round trip between two
probe clients and, in regions with several nodes, the mesh between them. ``--once`` prints a
table; otherwise it probes every interval and serves an HTML status page and ``/metrics``.
:mod:`.mapload` loads the map, :mod:`.probes` runs the probes, :mod:`.report` renders results,
:mod:`.service` is the loop and HTTP server, :mod:`.cli` the command line.
"""
