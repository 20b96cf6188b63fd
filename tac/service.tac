# Run with: twistd -ny tac/service.tac
# Builds the same service tree as `twistd mqttsvc`, configured only by the
# environment: MQTTSVC_DB, MQTTSVC_RPC, MQTTSVC_RPC_TOKEN_FILE, MQTTSVC_MIGRATE.
from twisted.application.service import Application

from mqttsvc.tap import Options, makeService

options = Options()
options.parseOptions([])
application = Application("mqttsvc")
makeService(options).setServiceParent(application)
