"""/v1: the OpenAI-compatible surface (handlers, and the wire format of the official objects)."""
