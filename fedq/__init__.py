"""fedq: federated learning of Keras models over Redis."""

__version__ = "0.1.0"
