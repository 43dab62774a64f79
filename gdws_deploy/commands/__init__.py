"""One module per CLI verb: parse flags, call the API, print. Registered in cli.VERBS."""
