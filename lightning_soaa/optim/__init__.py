"""The ``torch.optim.Optimizer`` classes."""
