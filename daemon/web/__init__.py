"""`kioskd web`: the kiosk's touch page, served by a small MQTT client of the kiosk."""
