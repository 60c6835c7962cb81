"""Code shared by every VRS service: settings, database, auth, errors, events and pure domain rules."""
