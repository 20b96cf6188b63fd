"""
The TLS context of a broker connection, from a site's L{TlsSettings}.
"""

from __future__ import annotations

import ssl

from mqttsvc.config import TlsSettings


def tls_context(settings: TlsSettings) -> ssl.SSLContext:
    """
    The TLS context for a broker: certificates and host names verified
    against the given CA bundle (or the system's), a client certificate for
    mutual TLS, unless the settings explicitly opt out of checking.

    Blocking (it reads files): call it from the connecting thread.
    """
    context = ssl.create_default_context(cafile=settings.ca_certs)
    if settings.certfile is not None:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
