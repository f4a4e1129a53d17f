"""Framework adapters for jest_stream (installed as ``jest_stream.integrations``)."""
