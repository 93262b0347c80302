"""Where VMs come from: each source finds VMs and hands their sessions a link."""
