"""nydus_actors: an actor-model re-implementation of nydusd."""

__version__ = "0.1.0"
