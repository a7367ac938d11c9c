"""A pickle payload that runs code when unpickled: it writes a marker file.

Tests use it to prove that loaders refuse such files (and that the payload is real)."""


class WritesAMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))
