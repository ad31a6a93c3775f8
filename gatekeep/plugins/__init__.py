"""
Drop-in protocol plugins, found with ``twisted.plugin.getPlugins``.

Any ``gatekeep/plugins`` directory on ``sys.path`` adds to this package, so a
third-party protocol ships a module there and gatekeep finds it.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
