"""Export to TensorFlow Lite, timing on a Raspberry Pi 3B, per-layer latency look-up tables.

The on-device timing script needs only tflite-runtime and numpy; everything else imports ``lit_nas``.
"""
