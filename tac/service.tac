# Run with: twistd -ny tac/service.tac
# Builds the same service tree as `twistd mqttsvc`, configured only by the
# environment: every option's MQTTSVC_* variable (MQTTSVC_DB, MQTTSVC_RPC,
# MQTTSVC_RPC_TOKEN_FILE, MQTTSVC_MIGRATE, MQTTSVC_INSTANCE, MQTTSVC_MANHOLE...,
# listed in README.md), read by the same code (tests/test_tac.py checks it).
# Logging follows MQTTSVC_LOG_FORMAT / MQTTSVC_LOG_FILE when either is set,
# else twistd's own (-l / --logfile).
from mqttsvc.tap import tac_application

application = tac_application()
