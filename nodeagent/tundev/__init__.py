"""The TUN side of the data plane: the Linux TUN device, a fake for tests, the filtering Wrapper."""

from nodeagent.tundev.device import TunDevice, TunError
from nodeagent.tundev.fake import FakeTun
from nodeagent.tundev.netconf import NetconfError

__all__ = ["FakeTun", "NetconfError", "TunDevice", "TunError"]
