"""The daemon's side: the child process that writes checkpoints."""
