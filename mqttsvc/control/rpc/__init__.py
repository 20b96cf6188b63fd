"""The JSON-RPC 2.0 control plane: dispatcher, methods and HTTP resource."""
