"""Schemathesis hooks for the fuzz run: import bodies are NDJSON text, which
schemathesis has no serializer for; send the generated string as it is."""

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if isinstance(value, bytes):
        return {"data": value}
    return {"data": str(value).encode("utf8")}
