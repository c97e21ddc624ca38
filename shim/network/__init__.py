"""Pod networking (Kata's tcfilter model) and the short-lived netns helper process that does the
netlink work, so pyroute2 never enters the daemon."""
