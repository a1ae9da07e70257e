"""Multi-host tests: zmesh nodes in Linux network namespaces joined by a bridge (root only)."""
