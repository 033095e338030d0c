"""mm_lightning: Karpathy's makemore part 3 (activations, gradients, BatchNorm) as a Lightning project."""

__version__ = "0.1.0"
