"""edgeward's benchmark harness: edgeward side by side with a direct connection,
HAProxy and nginx, interleaved rounds, medians and ratios. Run `python -m bench`."""
