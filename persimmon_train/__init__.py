"""persimmon-train: fine-tune ADEPT's Persimmon-8B natively in PyTorch."""

__version__ = "0.1.0"
