"""llama-smart-proxy: the behaviour (config loading, estimates, planning, children, the proxy)."""
