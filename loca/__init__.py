"""LOCA: location-aware self-supervised pretraining of Vision Transformers, in PyTorch."""
__version__ = "0.1.0"
