"""Where the service listens unless told otherwise: shared by the server's settings and the CLI's
client. Standard library only (the CLI imports it for --help)."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
