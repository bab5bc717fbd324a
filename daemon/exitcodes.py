"""Process exit codes; systemd's RestartPreventExitStatus= lists the ones a restart cannot fix."""

from typing import Final

OK: Final = 0
FAILURE: Final = 1
# sysexits.h EX_NOINPUT: the model file is missing or cannot be loaded.
MODEL_UNAVAILABLE: Final = 66
# sysexits.h EX_CONFIG: the configuration is invalid.
CONFIG_ERROR: Final = 78
