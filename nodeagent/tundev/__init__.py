"""The TUN side of the data plane: the Linux TUN device, a fake for tests, the filtering Wrapper."""
