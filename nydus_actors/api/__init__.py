"""The nydusd HTTP API: falcon resources, error mapping and the waitress server."""
