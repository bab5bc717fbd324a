"""kioskd: an offline question-answering kiosk on MQTT."""

__version__ = "0.1.0"
