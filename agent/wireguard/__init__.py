"""WireGuard datapath: key pair (keys), planner and peer diff (pure, plan) and
the reconciler that drives a kernel or wireguard-go backend (datapath)."""
