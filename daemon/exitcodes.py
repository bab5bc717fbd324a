"""Process exit codes; systemd's RestartPreventExitStatus= lists the ones a restart cannot fix."""

from typing import Final

OK: Final = 0
FAILURE: Final = 1
# sysexits.h EX_NOINPUT: the model file is missing or cannot be loaded.
MODEL_UNAVAILABLE: Final = 66
# sysexits.h EX_CONFIG: the configuration is invalid.
CONFIG_ERROR: Final = 78

# `kioskd ask` and `kioskd status` only (the daemon never exits with these). FAILURE (1) there
# means the kiosk answered with an error, or is online without a health message.
# sysexits.h EX_NOHOST: nothing is retained on P/status, so no kiosk lives at that prefix.
NO_KIOSK: Final = 68
# sysexits.h EX_UNAVAILABLE: the broker cannot be reached (refused, no route, no MQTT answer).
BROKER_UNREACHABLE: Final = 69
# sysexits.h EX_TEMPFAIL: the kiosk's retained status is `offline`; try again later.
KIOSK_OFFLINE: Final = 75
# sysexits.h EX_NOPERM: the broker refused the login (user name, password, certificate) or an ACL.
BROKER_REFUSED: Final = 77
# As timeout(1): no terminal message within --timeout-s (the question was cancelled).
NO_ANSWER: Final = 124
# 128 + SIGINT: Ctrl-C; the question was cancelled.
INTERRUPTED: Final = 130
# 128 + SIGPIPE, as for any writer whose reader went away (`| head`); the question was cancelled.
OUTPUT_CLOSED: Final = 141
