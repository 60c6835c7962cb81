"""The four VRS services and the ``vrs`` command that runs them."""
