"""Running the agent: build the LocalBackend, serve the LocalAPI, stop cleanly on a signal; follow
the WantRunning pref (``tailscale down``/``up``: leave control and drop the peers, log in again).

SIGHUP re-reads ``--netmap-file``; a file that does not load is refused with one error line and
the running netmap stays.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from nodeagent.backend import LocalBackend
from nodeagent.errors import ConfigError
from nodeagent.localapi.server import LocalAPIServer
from nodeagent.tailcfg import drop_bad_endpoints

log = logging.getLogger("nodeagent")

DEFAULT_STATE_DIR = "/var/lib/nodeagent"


@dataclass
class AgentOptions:
    socket: str
    state_dir: str = DEFAULT_STATE_DIR
    hostname: str | None = None
    tun: str | None = None  # TUN device name; None runs without a data plane
    port: int = 41641  # WireGuard UDP port (0 picks a free one)
    netmap_file: str | None = None  # a static netmap (JSON) instead of a control server
    login_server: str | None = None
    auth_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Agent:
    """One running agent: backend + LocalAPI (+ data plane and control once configured)."""

    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.backend = LocalBackend(opts.state_dir, hostname=opts.hostname)
        self.localapi = LocalAPIServer(self.backend, opts.socket)
        self.stopped = asyncio.Event()
        self.dataplane: Any = None
        self.paths: Any = None  # magicsock.layer.PathLayer, with the data plane
        self.control: Any = None
        self._running_lock = asyncio.Lock()  # one down/up transition at a time
        self._transitions: set[asyncio.Task[None]] = set()
        self.backend.prefs_listeners.append(self._on_prefs_change)

    async def start(self) -> None:
        self.backend.start()
        await self.localapi.start()
        try:
            if self.opts.tun:
                self._start_dataplane()
            if self.opts.netmap_file:
                self.apply_netmap(load_netmap_file(self.opts.netmap_file))
            if self.opts.login_server:
                await self._start_control()
        except BaseException:
            await self.stop()
            raise
        log.info("nodeagent %s: LocalAPI on %s, node key %s",
                 self.backend.capability_version, self.opts.socket, self.backend.node_public_key)

    def _start_dataplane(self) -> None:
        from nodeagent.dataplane import DataPlane
        from nodeagent.engine.wgtransport import WireGuardTransport
        from nodeagent.magicsock.layer import PathLayer

        st = self.backend.state
        transport = WireGuardTransport(st.node_key.private, port=self.opts.port)
        # magicsock chooses the paths of peers with a disco key (direct UDP or DERP).
        self.paths = PathLayer(transport, st.node_key, st.disco_key)
        dp = DataPlane(self.backend, transport, tun_name=self.opts.tun or "")
        loop = asyncio.get_running_loop()
        dp.start(loop)
        assert dp.engine is not None
        try:
            transport.start(loop, dp.engine.deliver_from)
        except OSError as e:
            dp.close()
            raise ConfigError(_port_error(e, self.opts.port)) from None
        self.paths.start(loop)
        self.backend.paths = self.paths
        self.backend.host.register_metrics(self.paths.metrics_samples)
        self.dataplane = dp
        log.info("WireGuard: listening on UDP port %d", transport.port)

    async def _start_control(self) -> None:
        from nodeagent.control.agent_link import ControlLink

        url = self.opts.login_server or ""
        if self.backend.prefs.ControlURL != url:  # Tailscale's ControlURL: the login server
            self.backend.edit_prefs({"ControlURLSet": True, "ControlURL": url})
        if not self.backend.prefs.WantRunning:  # left down (`tailscale down`): stay stopped
            self.backend.set_backend_state("Stopped")
            return
        port = self.dataplane.transport.port if self.dataplane is not None else 0
        self.control = ControlLink(self.backend, self.apply_netmap, port,
                                   self.opts.login_server or "", self.opts.auth_key)
        await self.control.start()
        if self.paths is not None:
            self.paths.set_on_endpoints(self.control.update_endpoints)

    def _on_prefs_change(self, changed: list[str]) -> None:
        """WantRunning changed (``tailscale down`` / ``up``): stop or resume the node."""
        if "WantRunning" not in changed:
            return
        task = asyncio.get_running_loop().create_task(self._follow_want_running(),
                                                      name="want-running")
        self._transitions.add(task)
        task.add_done_callback(self._transitions.discard)

    async def _follow_want_running(self) -> None:
        """Down: leave control (peers see the node go offline) and drop every peer from the
        data plane. Up: log in to control again (the node key is already registered) or
        re-apply the static netmap; the backend is Running again with the next netmap."""
        from nodeagent.tailcfg import NetworkMap

        async with self._running_lock:
            want = self.backend.prefs.WantRunning
            if not want and self.control is not None:
                await self.control.stop()
                self.control = None
                self.backend.set_health("control", None)
            if not want:
                nm = self.backend.netmap
                if self.dataplane is not None and nm is not None:
                    self.dataplane.apply_netmap(NetworkMap(SelfNode=nm.SelfNode,
                                                           DERPMap=nm.DERPMap))
                return
            if self.opts.login_server and self.control is None:
                try:
                    await self._start_control()
                except Exception as e:  # one line in the log and the status' health
                    log.error("control: %s", e)
                    self.backend.set_health("control", f"cannot log in to control: {e}")
                    self.backend.set_backend_state("NeedsLogin")
            elif self.backend.netmap is not None:
                self.apply_netmap(self.backend.netmap)

    def apply_netmap(self, nm: Any) -> None:
        """A netmap from control (or the static file): backend first, then the data plane.

        Peer endpoints that are not usable ``ip:port`` (or beyond ``tailcfg.MAX_ENDPOINTS``) are
        dropped first, with one log line for the whole netmap."""
        nm, dropped, why = drop_bad_endpoints(nm)
        if dropped:
            log.warning("netmap: ignored %d invalid peer endpoint(s); first: %s", dropped, why)
        self.backend.set_netmap(nm)
        if not self.backend.prefs.WantRunning:
            return  # stopped: the data plane keeps no peers until the node is up again
        if self.dataplane is not None:
            self.dataplane.apply_netmap(nm)
        if self.paths is not None:
            self.paths.apply_derp_map(nm.DERPMap)

    def reload_netmap_file(self) -> bool:
        """Re-read ``--netmap-file`` and apply it; False (and one error line) if it is bad."""
        path = self.opts.netmap_file
        if not path:
            return False
        try:
            nm = load_netmap_file(path)
        except ConfigError as e:
            log.error("reload refused, keeping the running netmap: %s", e)
            return False
        self.apply_netmap(nm)
        log.info("netmap file %s reloaded: %d peers", path, len(nm.Peers))
        return True

    async def stop(self) -> None:
        for task in list(self._transitions):
            task.cancel()
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.paths is not None:
            self.backend.paths = None
            await self.paths.close()
            self.paths = None
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None
        await self.localapi.stop()
        self.backend.shutdown()
        self.stopped.set()


def _port_error(e: OSError, port: int) -> str:
    """One line for a WireGuard UDP socket that cannot be bound."""
    import errno

    what = e.strerror or str(e)
    if e.errno == errno.EADDRINUSE:
        return (f"{what} (another agent or WireGuard on it?); choose another with --port or "
                "NODEAGENT_PORT, 0 for any free port")
    if e.errno == errno.EACCES and 0 < port < 1024:
        return f"{what} (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return what


def load_netmap_file(path: str) -> Any:
    """A netmap in the tailcfg JSON shape (SelfNode, Peers, PacketFilter, DERPMap), its packet
    filter checked as well."""
    import json

    from nodeagent.filter import FilterRuleError, parse_rules
    from nodeagent.tailcfg import WireError, netmap_from_wire

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"netmap file {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"netmap file {path}: not JSON: {e}") from None
    try:
        nm = netmap_from_wire(data)
        parse_rules(nm.PacketFilter or [])
    except (WireError, FilterRuleError) as e:
        raise ConfigError(f"netmap file {path}: {e}") from None
    return nm


async def run_agent(opts: AgentOptions) -> int:
    agent = Agent(opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM that arrives while the agent starts (its socket may already be
    # there) must still shut it down cleanly, not kill it with the default action.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
        if opts.netmap_file:
            loop.add_signal_handler(signal.SIGHUP, agent.reload_netmap_file)
        await stop.wait()
        log.info("nodeagent: shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await agent.stop()
    return 0


def run(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
