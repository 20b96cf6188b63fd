# Run with: twistd -ny tac/service.tac
# Builds the same service tree as `twistd mqttsvc`, configured only by the
# environment: every option's MQTTSVC_* variable (MQTTSVC_DB, MQTTSVC_RPC,
# MQTTSVC_RPC_TOKEN_FILE, MQTTSVC_MIGRATE, MQTTSVC_INSTANCE, MQTTSVC_MANHOLE...,
# listed in README.md).  Logging is twistd's own here (-l / --logfile).
from twisted.application.service import Application

from mqttsvc.tap import Options, makeService

options = Options()
options.parseOptions([])
application = Application("mqttsvc")
makeService(options).setServiceParent(application)
