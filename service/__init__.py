"""The control plane: REST, storage, metrics and the command line. Imports workers/, never the reverse."""
