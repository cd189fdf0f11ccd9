"""IPsec datapath: keys file, per-pair key derivation, planner, diff (pure) and
the XFRM reconciler that joins them to the kernel (datapath)."""
