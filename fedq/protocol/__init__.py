"""The protocol layer: Redis keys, the wire format, messages and their validation, the Redis
store and its Lua steps, reads of client-writable keys, models in parts, heartbeats.

Imports nothing from the other layers, and neither pandas, TensorFlow nor Keras
(tests/test_layers.py).
"""
