"""Alert delivery: the durable outbox, the dispatcher and the sinks."""
