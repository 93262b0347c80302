"""The daemon: start-up, supervision, metrics and health, state, systemd."""
