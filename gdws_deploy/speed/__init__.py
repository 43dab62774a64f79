"""Which form is fastest on a backend: backends, cost model, in-context timing, speed goals."""
