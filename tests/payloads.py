"""Pickle payloads that run code when unpickled: each makes a marker file.

Tests use them to prove that loaders refuse such files (and that the payload is real)."""


class WritesAMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


class RunsAShellCommand:
    """The classic payload: os.system, whose module torch's weights_only loader blocks outright (it words that
    refusal differently from an unknown global's)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))
