"""The trainer's side: everything that runs in the training process."""
