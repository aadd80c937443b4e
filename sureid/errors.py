"""``SureidError``: a problem the user can fix. Its own module, importing nothing, so that light
modules (the zoo, the command line) can raise it without loading torch or transformers."""


class SureidError(ValueError):
    """A problem the user can fix (wrong checkpoint, wrong input); the message says how."""
