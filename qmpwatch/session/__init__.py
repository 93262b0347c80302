"""One VM's session, whatever source carries it: resync, status probe, deadlines."""
