"""Loading built kernels and launching them, one module per target."""
