"""
The JSON-RPC 2.0 methods of the control plane: the dispatcher
(L{dispatcher}), the site methods (L{sites}), the read side and dead-letter
actions (L{observed}), keyset cursors (L{paging}), operator actions as
events (L{actions}) and C{rpc.discover}'s OpenRPC document (L{openrpc}),
gathered by L{methods}.  The HTTP resource that serves them is
L{mqttsvc.control.web}.
"""
