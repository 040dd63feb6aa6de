"""The node's own state as the LocalAPI shows it: prefs, persisted identity, status rendering."""
