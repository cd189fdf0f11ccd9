"""The agent in a cluster (``python -m agent run``): config document, Kubernetes
Node source and annotations, keys-file watch, the reconcile loop and its HTTP
endpoints. Everything here is I/O around the pure core in agent.ipsec and
agent.wireguard; the core never imports this package."""
