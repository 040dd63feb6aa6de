"""nodeagent feature connreject: connection-rejection diagnostics.

Registered through the ``nodeagent.features`` entry point. Importing this package is cheap: the
extension's modules load only when a LocalBackend asks for an extension instance.
"""

from nodeagent.ipnext import Feature

DESCRIPTION = ("Connection-rejection diagnostics (TSMP rejects, pendopen timeouts) exposed over "
               "debug-rejects LocalAPI and c2n endpoints")


def _extension() -> object:
    from nodeagent_connreject.extension import ConnRejectExtension

    return ConnRejectExtension()


def _cli() -> object:
    from nodeagent_connreject import cli

    return cli


FEATURE = Feature(name="connreject", description=DESCRIPTION, extension=_extension, cli=_cli())
